"""`kvprof whatif` through the real entry point: help, bad inputs (Error/Hint, exit codes),
a what-if on the recorded demo run and the seed model given as inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "fixtures" / "demo" / "run"
DISAGG = ["--traces", str(RUN / "traces" / "disagg"), "--aiperf", str(RUN / "aiperf" / "disagg"),
          "--one-clock"]


def kvprof(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "kvprof", "whatif", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[-2:]] == ["Error", "Hint"], proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_help_explains_the_inputs():
    proc = kvprof("--help")
    assert proc.returncode == 0
    for word in ("--traces", "--aiperf", "--given", "--prefill", "--decode", "--aggregated",
                 "--link-gbps", "--prewarm-handshake", "--calibrate-on", "step records",
                 "prediction"):
        assert word in proc.stdout, word


def test_run_without_step_records_is_refused_with_a_hint():
    assert_error(kvprof(*DISAGG), 3, "no engine step records", "--without-steps")


@pytest.mark.parametrize("args, code, word", [
    (["--prefill", "0", "--decode", "0"], 2, "zero workers"),
    (["--prefill", "2", "--decode", "0"], 2, "needs decode workers"),
    (["--aggregated", "2", "--prefill", "1"], 2, "one or the other"),
    (["--prefill", "-1"], 2, "--prefill"),
    (["--link-gbps", "0"], 2, "--link-gbps"),
    (["--levels", "1,x"], 2, "--levels"),
    (["--calibrate-on", "64"], 3, "no aiperf level"),
])
def test_impossible_configurations(args, code, word):
    assert_error(kvprof(*DISAGG, "--without-steps", *args), code, word)


def test_no_inputs_and_bad_model_file(tmp_path):
    assert_error(kvprof(), 2, "--traces")
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"schema": "kvprof.whatif/1", "load": {"levels": [1]},
                               "deployments": [{"groups": []}]}))
    assert_error(kvprof("--given", str(bad)), 2, "zero workers")
    bad.write_text("{")
    assert_error(kvprof("--given", str(bad)), 3, "JSON", "line 1")


def test_what_if_on_the_demo_run_labels_every_prediction():
    proc = kvprof(*DISAGG, "--without-steps", "--prefill", "1", "--decode", "2",
                  "--prewarm-handshake", "--link-gbps", "2", "--levels", "1,8",
                  "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = out["rows"]
    assert [r["source"] for r in rows[:6]] == ["measured", "predicted"] * 3
    what = [r for r in rows if r["deployment"].startswith("what-if")]
    assert [r["concurrency"] for r in what] == [1, 8]
    assert all(r["source"] == "predicted" for r in what)
    assert "2 decode" in what[0]["deployment"] and "pre-warmed" in what[0]["deployment"]
    assert out["validation"]["predicted_level"] == 4
    text = kvprof(*DISAGG, "--without-steps")
    assert text.returncode == 0
    assert "prediction of kvprof's what-if model" in text.stdout
    assert "Validation: calibrated on [1, 2], level 4" in text.stdout
    # The per-leg comparison at the predicted level: measured beside predicted, per leg.
    assert "Per leg at C=4, mean ms" in text.stdout
    legs = text.stdout.split("Per leg at C=4")[1]
    for leg in ("in ", "prefill.queue", "prefill.compute", "decode.queue", "out "):
        assert f"\n  {leg}" in legs, leg
