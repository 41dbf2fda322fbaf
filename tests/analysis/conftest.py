"""Shared fixtures of the analysis tests: the golden scenario, written once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "analysis"


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """The documented golden scenario (kvprof.analysis.scenario) with link samples."""
    from kvprof.analysis.scenario import write_scenario

    return write_scenario(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def golden_spans(golden):
    from kvprof.analysis.loaders.traces import load_spans

    return load_spans(golden.traces)


def run_kvprof(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "kvprof", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
