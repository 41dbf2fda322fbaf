"""Typer command definitions: options and help only; each body imports its subsystem lazily."""
