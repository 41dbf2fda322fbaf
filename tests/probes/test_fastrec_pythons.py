"""The API-server hooks on every CPython a vLLM image may run (3.10 to 3.13), not only the
tests' own: vLLM's images run 3.12, and `pip install kvprof` there builds the C part for it.

For each such Python found on this machine (`python3.X` on PATH, or pyenv's), the C part is
built with tools/build_fastrec.py (what the injection image does) beside a copy of kvprof,
and tests/probes/fastrec_scenario.py sends the same requests through the C recordings and
through the Python ones in that Python: the records must be the same, complete and in
order, a failing recording must be reported and still end its response, and the C part must
keep no memory per request. A Python not found here is skipped, saying so.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.probes import api_hooks

from .api_fakes import ROUTER_TP

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("fastrec_scenario.py")
BUILDER = REPO / "tools" / "build_fastrec.py"


def _python(minor: int) -> str | None:
    """A CPython 3.<minor> on this machine: the tests' own, on PATH, or pyenv's."""
    if sys.version_info[:2] == (3, minor):
        return sys.executable
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python3.{minor}"),
                  *sorted(glob.glob(f"{pyenv}/versions/3.{minor}.*/bin/python3.{minor}"))]
    for exe in filter(None, candidates):
        done = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip() == f"(3, {minor})":
            return exe
    return None


def _scenario(python: str, site: Path, cwd: Path, pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVPROF_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    if pure:
        env["KVPROF_PURE_PYTHON"] = "1"
    done = subprocess.run([python, "-s", str(SCENARIO)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


MINORS = [10, 11, 12, 13]


@pytest.mark.parametrize("minor", MINORS)
def test_the_hooks_record_the_same_in_c_and_python_on_each_cpython(minor, tmp_path):
    python = _python(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} on this machine")
    site = tmp_path / "site"
    shutil.copytree(REPO / "kvprof", site / "kvprof",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    built = subprocess.run([python, "-s", str(BUILDER), str(site / "kvprof" / "probes")],
                           capture_output=True, text=True, timeout=300)
    if built.returncode == 2:  # no compiler, or no headers for that Python
        pytest.skip(built.stderr.strip())
    assert built.returncode == 0, built.stderr
    assert f"cpython-3{minor}" in built.stdout

    c = _scenario(python, site, tmp_path, pure=False)
    py = _scenario(python, site, tmp_path, pure=True)
    assert c["python"].startswith(f"3.{minor}.")
    assert (c["implementation"], py["implementation"]) == ("c", "python")
    assert c["records"] == py["records"]
    # What both hold, position by position (api_hooks' record layout): two POSTs (through
    # uvicorn's probed cycle, then a plain server's send), each with two engine calls.
    assert len(c["records"]) == 2
    for record in c["records"]:
        assert record[0] == 30 and record[api_hooks.STATUS] == 200
        assert record[api_hooks.XID] == "xid-7" and record[api_hooks.PATH] == "/v1/completions"
        assert record[api_hooks.HTTP_TRACEPARENT] == ROUTER_TP
        assert record[api_hooks.RID] == "cmpl-xid-7-0"
        assert record[api_hooks.INTERNAL] == "cmpl-xid-7-0-0000abcd"
        assert record[api_hooks.EXTRA_ARGS] == {"do_remote_prefill": True,
                                                "remote_request_id": "cmpl-p-9-0",
                                                "traceparent": ROUTER_TP}
        for t in (api_hooks.T_RECV, api_hooks.T_FIRST_BYTES, api_hooks.T_END,
                  api_hooks.T_INPUT, api_hooks.T_HANDOFF, api_hooks.T_FIRST_OUTPUT):
            assert record[t] == "t", t
        (second,) = record[api_hooks.EXTRA_CALLS:]
        assert second[0] is None and second[api_hooks.RID] == "cmpl-xid-7-1"
        assert second[api_hooks.T_FIRST_OUTPUT] == "t" and second[api_hooks.OK] is True
    # The EngineCore requests carry the caller's trace (AsyncLLM drops it otherwise).
    assert c["core_requests"] == py["core_requests"] == [
        [f"cmpl-xid-7-{i}-0000abcd", {"traceparent": ROUTER_TP}] for i in (0, 1, 0, 1)]
    for run in (c, py):
        assert run["records_in_order"] is True
        assert run["bad_body_record_ended"] == [True]
        assert run["failures"] == ["ASGI send: RuntimeError('no truth')"]
        assert run["waiting_after"] == 0
    assert c["bytes_kept_by_2000_requests"] < 16_000


def test_the_injection_image_builds_the_c_part_for_each_of_those_pythons():
    """The Dockerfile (not built here: no Docker engine on this machine) runs the same
    builder for the same versions and puts the files into the site the init container
    copies into vLLM pods; the build context carries the builder and the source."""
    text = (REPO / "Dockerfile").read_text()
    loop = re.search(r"for v in ([^;]+); do\s*\\\s*/opt/python/\$v/bin/python "
                     r"tools/build_fastrec.py /out \|\| exit 1", text)
    assert loop is not None
    assert loop.group(1).split() == [f"cp3{m}-cp3{m}" for m in MINORS]
    assert "COPY --from=fastrec /out/ /opt/kvprof/site/kvprof/probes/" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"tools", "kvprof", "tools/", "*.c"} & set(ignored)
