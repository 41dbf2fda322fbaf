"""Build the probes' C part (kvprof/probes/_fastrec.c) for the Python that runs this script.

`pip install kvprof` builds it through setup.py for the Python it installs into. This script
is for a kvprof carried to another Python: the Dockerfile's injection image copies kvprof
into a vLLM pod whose Python is not the image's own, so it builds the extension once per
CPython a vLLM image may run (each file is named for its version, as
``_fastrec.cpython-312-x86_64-linux-gnu.so``, so they sit side by side and each Python loads
its own). Without the right one, the hooks run their Python versions (about twice the cost
per request, bench/api_overhead.py). Needs only a C compiler and the Python's headers (no
setuptools: the manylinux images' Pythons do not all carry it).

    python tools/build_fastrec.py OUT_DIR

Exit codes: 0 built and loaded; 1 the compiler failed or the result does not load in this
Python (an undefined symbol: an API this Python lacks); 2 usage, or no compiler or headers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "kvprof" / "probes" / "_fastrec.c"
MODULE = "kvprof.probes._fastrec"


class BuildError(Exception):
    """Why the extension was not built; ``code`` is the exit code."""

    def __init__(self, message: str, hint: str, code: int = 1) -> None:
        super().__init__(message)
        self.hint, self.code = hint, code


def compiler() -> list[str]:
    """$CC, else the compiler this Python was built with, else cc."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def build(out_dir: Path, source: Path = SOURCE) -> Path:
    """Compile ``source`` for this Python into ``out_dir`` and load it once; the file."""
    cc = compiler()
    if shutil.which(cc[0]) is None:
        raise BuildError(f"no C compiler: {cc[0]} is not on PATH",
                         "install gcc (or set CC)", code=2)
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise BuildError(f"no Python.h in {include}",
                         "install this Python's development headers (python3-dev)", code=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ("_fastrec" + sysconfig.get_config_var("EXT_SUFFIX"))
    # An API this Python lacks must fail here, not as an undefined symbol at import.
    cmd = [*cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror=implicit-function-declaration",
           f"-I{include}", str(source), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"compiling {source.name} for Python {sys.version.split()[0]} "
                         f"failed:\n{done.stderr.strip()}",
                         "the compiler's message above names the line")
    spec = importlib.util.spec_from_file_location(MODULE, target)
    try:
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as exc:
        target.unlink(missing_ok=True)
        raise BuildError(f"{target.name} does not load in this Python: {exc}",
                         "it uses an API this Python version lacks") from None
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the extension file")
    args = parser.parse_args(argv)
    try:
        target = build(args.out_dir)
    except BuildError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        print(f"Hint: {exc.hint}", file=sys.stderr)
        return exc.code
    print(f"built {target} for Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
