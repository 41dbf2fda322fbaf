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


_chain_existing_sitecustomize()
_activate()
