"""kvprof bootstrap: put on PYTHONPATH by `kvprof attach`; activates probes, chains the rest."""

import importlib
import os
import sys


def _chain_existing_sitecustomize() -> None:
    # Another sitecustomize further down sys.path (a distro's, an APM agent's) still runs.
    here = os.path.dirname(os.path.abspath(__file__))
    saved_path = list(sys.path)
    saved_mod = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        try:
            importlib.import_module("sitecustomize")
        except ImportError as exc:
            if getattr(exc, "name", None) != "sitecustomize":
                raise
    except Exception as exc:  # their failure is reported, never fatal to the host
        sys.stderr.write(f"kvprof: chained sitecustomize failed: {exc!r}\n")
    finally:
        sys.path[:] = saved_path
        if saved_mod is not None:
            sys.modules["sitecustomize"] = saved_mod


def _activate() -> None:
    if os.environ.get("KVPROF_ENABLED", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    try:
        from kvprof.probes.activation import activate

        activate()
    except Exception as exc:
        sys.stderr.write(f"kvprof: probes not activated: {exc!r}\n")
        _tell_the_launcher(exc)


def _tell_the_launcher(exc: Exception) -> None:
    """Leave `kvprof attach` a note, so it fails loudly instead of reporting 0 spans and
    exit 0 (a Python without kvprof, e.g. the system's instead of the venv's)."""
    stats_dir = os.environ.get("KVPROF_STATS_DIR")  # kvprof.probes.config.ENV_STATS_DIR
    if not stats_dir:
        return
    try:
        path = os.path.join(stats_dir, f"load-failed-{os.getpid()}.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"{sys.executable}\n{type(exc).__name__}: {exc}\n")
    except OSError:
        pass


_chain_existing_sitecustomize()
_activate()
