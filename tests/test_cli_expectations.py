"""Commands that behave as people expect (issue 22): -h everywhere, placeholders in words,
--format and --out agree, n/a ratios say why, 80-column tables, 0644 files, no stray warnings."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent / "fixtures" / "demo" / "run"
COMMANDS = [[], ["report"], ["audit"], ["compare"], ["microbench"], ["attach"], ["check"],
            ["collect"], ["traces"], ["traces", "convert"], ["traces", "receive"]]


def kvprof(*args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvprof", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "kvprof")
def test_dash_h_works_everywhere_and_speaks_in_words(cmd: list[str]) -> None:
    r = kvprof(*cmd, "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: kvprof")
    assert r.stdout == kvprof(*cmd, "--help").stdout
    # Typer's defaults were {src}, <path>, <list[Path]>, <list[int]>: words instead.
    assert not re.findall(r"\{[a-z_]+\}|<[a-z][\w\[\], ]*>", r.stdout), r.stdout


def test_receive_help_says_what_a_sender_sees() -> None:
    """A real OTLP client gets OK + partial_success for logs/metrics (tests/receiver), as the
    README says; the help said 404 / UNIMPLEMENTED."""
    text = " ".join(kvprof("traces", "receive", "-h").stdout.split())
    assert "partial_success" in text and "404 / UNIMPLEMENTED" not in text
    assert "partial_success" in (RUN.parents[3] / "README.md").read_text()


def _report(*args, cwd: Path) -> subprocess.CompletedProcess:
    return kvprof("report", "--traces", RUN / "traces" / "disagg", "--one-clock", *args, cwd=cwd)


def test_format_and_out_follow_each_other(tmp_path: Path) -> None:
    r = _report("--format", "md", cwd=tmp_path)  # no --out: out/report.md, Markdown
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "report.md").read_text().startswith("# ")
    assert not (tmp_path / "out" / "report.html").exists()
    r = _report("--out", "r.json", cwd=tmp_path)  # no --format: JSON, from the suffix
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["requests"] > 0
    r = _report("--out", "r.md", "--format", "html", cwd=tmp_path)  # they disagree: say so
    assert r.returncode == 2
    assert r.stderr.startswith("Error: --out r.md ends in .md but --format is html")
    assert "Hint:" in r.stderr and "Traceback" not in r.stderr
    for f in (tmp_path / "out" / "report.md", tmp_path / "r.json"):
        assert f.stat().st_mode & 0o777 == 0o644


def test_single_file_report_prints_no_matplotlib_warning(tmp_path: Path) -> None:
    one = sorted((RUN / "traces" / "disagg").glob("kvprof-dynamo-decode-*.jsonl"))[0]
    r = kvprof("report", "--traces", one, "--out", tmp_path / "r.html")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "No artists" not in r.stderr, r.stderr


def test_ratio_with_a_zero_side_is_na_with_the_reason(tmp_path: Path) -> None:
    r = kvprof("compare", "--baseline", RUN / "aiperf" / "agg", "--candidate",
               RUN / "aiperf" / "disagg", "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    assert "infx" not in r.stdout and "inf" not in r.stdout
    assert "n/a (baseline is 0)" in r.stdout
    # A side that is small but not 0 shows its digits next to its ratio, not "0.0".
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[4].endswith("x"):
            assert "0.0" not in cells[1:3], line
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    na = [row for t in doc["tables"] for row in t["rows"] if row["ratio"] is None]
    assert na and all(row["ratio_na"].startswith("n/a (") for row in na)
    assert (tmp_path / "cmp" / "compare.md").stat().st_mode & 0o777 == 0o644


def test_microbench_tables_fit_80_columns() -> None:
    from rich.console import Console

    from kvprof.microbench.render import render

    console = Console(width=80, file=io.StringIO(), highlight=False)
    render(console, json.loads((RUN / "microbench.json").read_text()))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    # Every header word on one line: no column squeezed to one word per line.
    assert re.search(r"step\s+ms\s+ms\s+ms\s+GB/s\s+GB/s\s+limit", text), text
    assert "gather: paged -> contiguous staging" in text


def test_files_written_are_0644(tmp_path: Path) -> None:
    from kvprof.outputs import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        atomic_write(tmp_path / "secret", "x", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_attach_fails_loudly_when_the_probes_cannot_load(tmp_path: Path) -> None:
    """A Python without kvprof (the base interpreter, not the venv's) runs unprobed: that is
    an error with the venv's Python as the hint, not "0 spans" and exit 0."""
    # Run from tmp_path: from the repository's root `import kvprof` finds the source tree.
    bases = [b for b in (getattr(sys, "_base_executable", None), "/usr/bin/python3")
             if b and os.path.exists(b) and subprocess.run(
                 [b, "-c", "import kvprof"], capture_output=True, cwd=tmp_path).returncode]
    if not bases:
        pytest.skip("every Python here has kvprof: none to show the failure with")
    r = kvprof("attach", "--exporter", "file", "--output", tmp_path / "t", "--", bases[0],
               "-c", "print('ran')", cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "ran" in r.stdout  # the command itself still ran
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "No module named 'kvprof'" in errors[0], r.stderr
    assert f"Hint: Run the command with the Python kvprof is installed in: kvprof attach -- " \
           f"{sys.executable}" in r.stderr
    assert "kvprof report --traces" not in r.stderr  # no pointer to traces that do not exist
