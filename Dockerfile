# kvprof collector / probe-injection image: slim Python, kvprof without torch or vLLM.
#   docker build -t ghcr.io/kvprof/kvprof:0.1.0 .
# DaemonSet: `kvprof collect ...` (manifests/base). Init container: copies /opt/kvprof/site
# (kvprof + its pure-Python OpenTelemetry deps, with dist-info so vLLM finds the plugin entry
# point) into the vLLM worker pod (manifests/components/inject).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY kvprof ./kvprof
# setup.py (the probes' optional C part) stays out: no compiler in this image, and the vLLM
# image's Python may not be this one; the API-server hooks run their Python versions.
# The collector's runtime needs: no torch, no vLLM (pyproject's bench extra stays out).
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt . \
 && pip install --no-cache-dir --no-deps --target=/opt/kvprof/site . \
      opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
      opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common \
      opentelemetry-proto wrapt

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY --from=build /opt/kvprof/site /opt/kvprof/site
# Runs as root with every capability dropped (see manifests/base/daemonset.yaml): the
# kubelet's pod-resources socket is root-only. The root filesystem is mounted read-only.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 9402
ENTRYPOINT ["kvprof"]
CMD ["collect", "--listen", "0.0.0.0:9402"]
