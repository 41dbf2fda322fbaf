"""Shared fixtures: a tiny random Qwen3 model, built once per test session in a temp dir;
and no process outlives the session (every one started carries the session's marker)."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctools import MARKER, sweep  # noqa: E402


def pytest_sessionstart(session) -> None:
    # Inherited by every process the tests start, however deep: the sweep below finds them.
    os.environ[MARKER] = f"kvprof-tests-{uuid.uuid4().hex[:12]}"

    def _terminate(signum, frame):  # SIGTERM (CI timeout, kill) unwinds like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)


def pytest_sessionfinish(session, exitstatus) -> None:
    left = sweep(os.environ[MARKER])
    if left:
        sys.stderr.write(f"\nkvprof tests: stopped {len(left)} leftover process(es): "
                         + "; ".join(left[:5]) + "\n")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A vLLM-servable tiny model folder (config.json, weights, tokenizer, chat template)."""
    sys.path.insert(0, str(REPO / "demo"))
    try:
        from tiny_model import build_tiny_model
    finally:
        sys.path.remove(str(REPO / "demo"))
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
