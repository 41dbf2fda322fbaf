"""The optional C part of the probes: the API-server hooks' request-path work
(kvprof/probes/_fastrec.c). Optional: without a C compiler the install goes on and the
hooks run their Python versions (kvprof.probes.api_hooks)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvprof.probes._fastrec", ["kvprof/probes/_fastrec.c"],
                             optional=True)])
