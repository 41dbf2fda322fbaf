"""Shared fixtures: a tiny random Qwen3 model, built once per test session in a temp dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A vLLM-servable tiny model folder (config.json, weights, tokenizer, chat template)."""
    sys.path.insert(0, str(REPO / "demo"))
    try:
        from tiny_model import build_tiny_model
    finally:
        sys.path.remove(str(REPO / "demo"))
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
