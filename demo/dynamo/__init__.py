"""NVIDIA Dynamo 1.6.1 (frontend + vLLM workers) on this CPU, from .venv-dynamo."""
