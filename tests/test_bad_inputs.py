"""Every kvprof command against malformed inputs of every class (tests/bad_inputs.py): exit
2/3 with one Error: and one Hint:, or exit 0 naming the bad part with the rest right; never a
traceback, an internal error, a crash, a hang or a half-written file."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bad_inputs  # noqa: E402

CASES = bad_inputs.cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All cases run once, a few at a time (each is a real `python -m kvprof` subprocess)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with bad_inputs.corpus_env(root) as env:
        def one(case):
            return case.name, bad_inputs.run_case(case, env, root / "cases" / case.name)

        workers = int(os.environ.get("KVPROF_CORPUS_JOBS", str(min(4, os.cpu_count() or 1))))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            yield dict(pool.map(one, CASES))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_contract(results, case):
    problems = results[case.name]
    if problems == ["SKIP"]:
        pytest.skip(f"needs a {case.needs} filesystem (root and tmpfs)")
    assert not problems, f"[{case.klass}] " + "; ".join(problems)


def test_every_class_is_covered():
    classes = {c.klass for c in CASES}
    assert {"deep_nesting", "wrong_json_types", "bad_numbers", "parquet", "non_utf8",
            "path_kinds", "unwritable_output", "full_disk", "duplicates",
            "concurrency_folders", "numeric_options"} <= classes
    commands = {c.build.__name__ for c in CASES}
    assert commands  # builders exist; the commands themselves are named in the case names
    names = " ".join(c.name for c in CASES)
    for cmd in ("report", "audit", "compare", "convert", "receive", "collect", "microbench",
                "attach", "check"):
        assert cmd in names, cmd
