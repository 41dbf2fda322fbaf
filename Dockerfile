# kvprof collector / probe-injection image: slim Python, kvprof without torch or vLLM.
#   docker build -t ghcr.io/kvprof/kvprof:0.1.0 .
#   (arm64: --build-arg MANYLINUX=quay.io/pypa/manylinux_2_28_aarch64 --platform linux/arm64)
# DaemonSet: `kvprof collect ...` (manifests/base). Init container: copies /opt/kvprof/site
# (kvprof + its pure-Python OpenTelemetry deps, with dist-info so vLLM finds the plugin entry
# point) into the vLLM worker pod (manifests/components/inject).
ARG MANYLINUX=quay.io/pypa/manylinux_2_28_x86_64

# The probes' C part (kvprof/probes/_fastrec.c: the API-server hooks at about half the cost
# of their Python versions, bench/api_overhead.py), built for every CPython a vLLM image may
# run. The vLLM pod's Python is not this image's, and each extension file is named for its
# version (_fastrec.cpython-312-x86_64-linux-gnu.so), so all four sit side by side in the
# site and each Python loads its own. manylinux_2_28: glibc 2.28, older than any vLLM
# image's. tools/build_fastrec.py fails the build on an API a version lacks
# (tests/probes/test_fastrec_pythons.py runs the same script and the hooks on each version).
FROM ${MANYLINUX} AS fastrec
WORKDIR /src
COPY kvprof/probes/_fastrec.c kvprof/probes/
COPY tools/build_fastrec.py tools/
RUN for v in cp310-cp310 cp311-cp311 cp312-cp312 cp313-cp313; do \
      /opt/python/$v/bin/python tools/build_fastrec.py /out || exit 1; \
    done

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY kvprof ./kvprof
# setup.py (the probes' optional C part) stays out: no compiler in this image; the C part
# comes from the fastrec stage, for each Python version.
# The collector's runtime needs: no torch, no vLLM (pyproject's bench extra stays out).
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt . \
 && pip install --no-cache-dir --no-deps --target=/opt/kvprof/site . \
      opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
      opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common \
      opentelemetry-proto wrapt

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY --from=build /opt/kvprof/site /opt/kvprof/site
COPY --from=fastrec /out/ /opt/kvprof/site/kvprof/probes/
# Runs as root with every capability dropped (see manifests/base/daemonset.yaml): the
# kubelet's pod-resources socket is root-only. The root filesystem is mounted read-only.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 9402
ENTRYPOINT ["kvprof"]
CMD ["collect", "--listen", "0.0.0.0:9402"]
