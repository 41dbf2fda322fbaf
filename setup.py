"""The optional C part of the probes: the API-server hooks' request-path work
(kvprof/probes/_fastrec.c). Optional: without a C compiler the install goes on and the
hooks run their Python versions (kvprof.probes.api_hooks). KVPROF_PURE_WHEEL=1 leaves it out
altogether, for a py3-none-any wheel that installs on any Python (tools/gpu_wheels.py)."""

import os

from setuptools import Extension, setup

PURE = bool(os.environ.get("KVPROF_PURE_WHEEL"))
setup(ext_modules=[] if PURE else [
    Extension("kvprof.probes._fastrec", ["kvprof/probes/_fastrec.c"], optional=True)])
