"""The Makefile's disk check before each venv install (make's own rules, run for real; only
`df` is replaced, by a script that reports a chosen amount of free space)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(tmp_path: Path, free_gb: int, *extra: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """`make .venv-aiperf/.installed` in a folder holding only the Makefile, with a `df`
    that reports ``free_gb`` free and a PYTHON that only leaves a mark (no venv is built)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\n"
                  "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/x 262144000 1000 {free_gb * 1048576} 1% /'\n")
    python = bin_dir / "python"
    python.write_text(f"#!/bin/sh\ntouch {tmp_path}/python-ran\nexit 3\n")
    for script in (df, python):
        script.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    shutil.copy(REPO / "Makefile", work / "Makefile")
    run_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **(env or {})}
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={python}",
                           ".venv-aiperf/.installed", *extra],
                          cwd=work, env=run_env, capture_output=True, text=True, timeout=60)


def test_a_short_disk_stops_before_pip_with_an_error_and_a_hint(tmp_path: Path) -> None:
    done = _make(tmp_path, free_gb=1)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith(("Error:", "Hint:"))]
    assert lines[0] == ("Error: installing .venv-aiperf needs about 2 GB of disk; 1 GB is free "
                        f"here ({tmp_path / 'work'}).")
    assert lines[1].startswith("Hint: free some space")
    assert not (tmp_path / "python-ran").exists()  # nothing was installed


def test_enough_disk_goes_on_to_the_install(tmp_path: Path) -> None:
    done = _make(tmp_path, free_gb=50)
    assert "Error: installing" not in done.stderr
    assert (tmp_path / "python-ran").exists()


def test_the_check_can_be_skipped(tmp_path: Path) -> None:
    done = _make(tmp_path, free_gb=0, env={"KVPROF_SKIP_DISK_CHECK": "1"})
    assert "Error: installing" not in done.stderr
    assert (tmp_path / "python-ran").exists()
