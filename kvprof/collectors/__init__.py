"""kvprof collectors."""
