"""Gather the wheels bench/gpu_check.py needs on a GPU machine that lacks them; print the command.

A lent GPU machine has PyTorch with CUDA and no network: what the check imports and that
machine's image lacks must travel with the command, 64 MiB at most together with the working
tree. What the check imports is measured, not guessed: a tiny dry run of the check (CPU, 64
tokens) in a fresh interpreter, whose ``sys.modules`` are mapped to their distributions. Those
the image already has (``--image-packages``, one name per line; the default is the device
image's list recorded in tools/gpu_image_packages.txt) are left out; the rest are downloaded as
wheels for the target Python and platform, at the versions installed here, and kvprof itself is
built as a pure ``py3-none-any`` wheel (its optional C part is for the API-server probes, which
the check does not use).

    python tools/gpu_wheels.py            # -> .whl/*.whl and the one-line command to run there
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 1024 * 1024  # the device tool carries 64 MiB: working tree and wheels
COMMAND_LIMIT = 2000  # characters in one device command
TARGET = "/tmp/kvprof-site"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Imported by the dry run but provided by the image whatever its list says (stdlib-adjacent).
ALWAYS_THERE = {"pip", "setuptools", "wheel"}

_PROBE = r"""
import json, sys, tempfile
sys.path.insert(0, {bench!r})
import gpu_check
out = tempfile.mkdtemp()
gpu_check.main(["--device", "cpu", "--tokens", "64", "--iters", "1", "--transports", "copy,gloo",
                "--hbm-gib", "0.01", "--pcie-gib", "0.01", "--collect-s", "0",
                "--cost-ticks", "2", "--out", out])
from importlib.metadata import packages_distributions
dists = packages_distributions()
tops = {{m.split(".")[0] for m in list(sys.modules)}}
needed = sorted({{d for t in tops for d in dists.get(t, ())}})
print("NEEDED=" + json.dumps(needed))
"""


def normalise(name: str) -> str:
    """PEP 503 name: what pip compares."""
    return re.sub(r"[-_.]+", "-", name).lower()


def needed_distributions(python: str = sys.executable) -> list[str]:
    """Distributions whose modules a dry run of the check imports (kvprof and torch included)."""
    code = _PROBE.format(bench=str(ROOT / "bench"))
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("NEEDED="):
            return json.loads(line.removeprefix("NEEDED="))
    raise SystemExit(f"Error: the check's dry run failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-2000:]}\nHint: run bench/gpu_check.py --device cpu first.")


def image_packages(path: Path) -> set[str]:
    """Names in a package list (``pip list --format=freeze`` or one name a line; # comments)."""
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalise(re.split(r"[=<>~ ]", line, maxsplit=1)[0]))
    return names


def requirement_closure(root: str = "kvprof") -> set[str]:
    """What pip resolves for ``root`` (its requirements, transitively, no extras), as installed."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    todo = [root]
    while todo:
        name = normalise(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s;\[<>=!~(]", req, maxsplit=1)[0])
    return seen


def to_carry(needed: list[str], have: set[str], resolved: set[str]) -> list[str]:
    """What must travel: imported by the check AND resolved by pip for kvprof (so not what was
    imported only because it happened to be installed: nixl, dill), not in the image, not
    kvprof itself (built here as its own wheel)."""
    return sorted(d for d in needed if normalise(d) in resolved
                  and normalise(d) not in have | ALWAYS_THERE and normalise(d) != "kvprof")


def installed_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def build_kvprof_wheel(dest: Path) -> Path:
    """kvprof as py3-none-any (no C part), built from this checkout."""
    env = {**os.environ, "KVPROF_PURE_WHEEL": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-build-isolation", "-w", tmp, str(ROOT)], check=True, env=env)
        built = next(Path(tmp).glob("kvprof-*.whl"))
        if not built.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"Error: kvprof built as {built.name}, not a pure wheel.")
        target = dest / built.name
        shutil.move(str(built), target)
    return target


def download(dists: list[str], dest: Path, python_version: str) -> None:
    for dist in dists:
        spec = f"{dist}=={installed_version(dist)}"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "-d", str(dest), spec]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True)


def device_command(wheel_dir: str = ".whl") -> str:
    """The one command the device tool runs: install into a temporary target, run the check."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
            f"--target {TARGET} {wheel_dir}/*.whl && export PYTHONPATH={TARGET} && "
            "PYTHONUNBUFFERED=1 timeout 470 python3 bench/gpu_check.py "
            "--out \"${OUT:-out/gpu-check}\"")


def tree_bytes() -> int:
    """What the working tree itself weighs when it travels (tracked + untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files
               if f and (ROOT / f.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl", help="wheel folder (git-ignored)")
    ap.add_argument("--image-packages", type=Path, default=ROOT / "tools" /
                    "gpu_image_packages.txt", help="the GPU image's packages, one name a line")
    ap.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    ap.add_argument("--list-only", action="store_true", help="print what would travel, fetch none")
    args = ap.parse_args(argv)

    needed = needed_distributions()
    carry = to_carry(needed, image_packages(args.image_packages), requirement_closure())
    print(f"the check imports {len(needed)} distributions; the image lacks: "
          f"{', '.join(carry) or 'none'} (+ kvprof itself)")
    if args.list_only:
        return 0
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    download(carry, args.dest, args.python_version)
    build_kvprof_wheel(args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    for w in wheels:
        print(f"  {w.name}  {w.stat().st_size / 1e6:.2f} MB")
    print(f"wheels {size / 2**20:.2f} MiB + working tree {tree / 2**20:.2f} MiB = "
          f"{(size + tree) / 2**20:.2f} MiB of the {LIMIT_BYTES / 2**20:.0f} MiB carried")
    if size + tree > LIMIT_BYTES:
        print("Error: more than the device tool carries.", file=sys.stderr)
        print("Hint: give --image-packages the target image's real list (pip list there).",
              file=sys.stderr)
        return 3
    command = device_command(os.path.relpath(args.dest, ROOT))
    assert len(command) <= COMMAND_LIMIT
    print(f"carry: [\"{os.path.relpath(args.dest, ROOT)}\"]  ({len(command)} characters)")
    print(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
