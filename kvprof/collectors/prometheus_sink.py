"""Prometheus sink: a prometheus-client custom collector over the latest samples, and /metrics.

Each sampler's latest :class:`SampleSet` replaces its previous one; a scrape renders them
all, plus ``kvprof_collector_duration_seconds{collector}``, ``kvprof_collector_success
{collector}`` and one ``kvprof_collector_no_data_info`` series per explicit no-data. Counters
are exposed with ``_total`` (prometheus-client appends it to the semconv name).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvprof import semconv
from kvprof.collectors.base import SampleSet

log = logging.getLogger(__name__)

HELP = {
    semconv.METRIC_GPU_INFO: "GPU identity (value 1): index, UUID, name, PCI bus id.",
    semconv.METRIC_GPU_UTILIZATION: "Fraction of the last sample period a kernel ran (NVML).",
    semconv.METRIC_GPU_MEMORY_UTILIZATION: "Fraction of time device memory was read/written.",
    semconv.METRIC_GPU_MEMORY_USED: "Device memory used, bytes.",
    semconv.METRIC_GPU_MEMORY_TOTAL: "Device memory total, bytes.",
    semconv.METRIC_GPU_POWER: "Board power draw, watts.",
    semconv.METRIC_GPU_ENERGY: "Energy used since the driver loaded, joules.",
    semconv.METRIC_GPU_TEMPERATURE: "GPU core temperature, degrees Celsius.",
    semconv.METRIC_GPU_PCIE_TX: "Bytes the GPU sent over PCIe (NVML field value).",
    semconv.METRIC_GPU_PCIE_RX: "Bytes the GPU received over PCIe (NVML field value).",
    semconv.METRIC_GPU_PROCESS: "A compute process on the GPU (value 1), by host PID.",
    semconv.METRIC_GPU_PROCESS_MEMORY: "Device memory used by a compute process, bytes.",
    semconv.METRIC_GPU_TOPOLOGY_INFO: "GPU NUMA node and closest InfiniBand device(s), value 1.",
    semconv.METRIC_NVLINK_TX: "NVLink data bytes sent on the link (NVML counts KiB).",
    semconv.METRIC_NVLINK_RX: "NVLink data bytes received on the link (NVML counts KiB).",
    semconv.METRIC_NVLINK_UP: "1 when the NVLink link is up; label remote_pci_bus_id.",
    semconv.METRIC_IB_XMIT: "Bytes sent on the port (sysfs 4-octet words x 4).",
    semconv.METRIC_IB_RCV: "Bytes received on the port (sysfs 4-octet words x 4).",
    semconv.METRIC_IB_XMIT_PACKETS: "Packets sent on the port.",
    semconv.METRIC_IB_RCV_PACKETS: "Packets received on the port.",
    semconv.METRIC_IB_XMIT_WAIT: "Ticks the port had data to send but no flow-control credits.",
    semconv.METRIC_IB_ERRORS: "Port error counters, by sysfs counter name.",
    semconv.METRIC_IB_RATE: "Link signalling rate from sysfs 'rate', bytes per second.",
    semconv.METRIC_IB_UP: "1 when the port state is ACTIVE; labels state, link_layer.",
    semconv.METRIC_IB_XMIT_RATE: "Achieved send rate over the last interval, bytes/s.",
    semconv.METRIC_IB_RCV_RATE: "Achieved receive rate over the last interval, bytes/s.",
    semconv.METRIC_HOST_CPU: "Host CPU utilisation since the previous sample, 0..1.",
    semconv.METRIC_HOST_MEMORY_USED: "Host memory used, bytes.",
    semconv.METRIC_HOST_MEMORY_TOTAL: "Host memory total, bytes.",
    semconv.METRIC_NIC_TX: "Bytes sent by the network interface (TCP fallback shows here).",
    semconv.METRIC_NIC_RX: "Bytes received by the network interface.",
    semconv.METRIC_PLACEMENT_INFO: "Which pod/container holds which GPU on which node, value 1.",
    semconv.METRIC_COLLECTOR_DURATION: "Seconds the collector's last sample took.",
    semconv.METRIC_COLLECTOR_SUCCESS: "1 when the collector's last sample produced data.",
    semconv.METRIC_COLLECTOR_NO_DATA: "An explicit 'no data' (value 1) with its reason.",
    semconv.METRIC_PROCESS_RUNQUEUE_WAIT: "Seconds the process's threads were runnable but "
    "waited for a CPU (schedstat run-queue wait, summed over threads).",
    semconv.METRIC_PROCESS_CPU: "Seconds the process's threads ran on a CPU (schedstat).",
    semconv.METRIC_PROCESS_NONVOLUNTARY_SWITCHES: "Times the process's threads were "
    "preempted (involuntary context switches).",
    semconv.METRIC_PROCESS_THREAD_WAIT_MAX: "Run-queue wait in the last interval of the "
    "process's thread that waited most (label thread), seconds.",
}


def metric_families(sets: Iterable[SampleSet]) -> list:
    """Build prometheus-client metric families (sorted: stable output for golden files)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    series: dict[str, tuple[bool, list[tuple[dict[str, str], float]]]] = {}

    def add(metric: str, counter: bool, labels: dict[str, str], value: float) -> None:
        entry = series.get(metric)
        if entry is None:
            entry = series[metric] = (counter, [])
        entry[1].append((labels, value))

    for result in sets:
        for s in result.all_samples():
            add(s.metric, s.counter, s.labels, s.value)
        collector = {"collector": result.collector}
        add(semconv.METRIC_COLLECTOR_DURATION, False, collector, result.duration_s)
        add(semconv.METRIC_COLLECTOR_SUCCESS, False, collector, 1.0 if result.ok else 0.0)
        for nd in result.no_data:
            add(semconv.METRIC_COLLECTOR_NO_DATA, False,
                {"collector": result.collector, "entity": nd.entity, "metric": nd.metric,
                 "reason": nd.reason}, 1.0)

    families = []
    for metric in sorted(series):
        counter, rows = series[metric]
        keys = sorted({k for labels, _ in rows for k in labels})
        cls = CounterMetricFamily if counter else GaugeMetricFamily
        family = cls(metric, HELP.get(metric, metric), labels=keys)
        seen = set()
        for labels, value in sorted(rows, key=lambda r: [r[0].get(k, "") for k in keys]):
            label_values = [labels.get(k, "") for k in keys]
            if tuple(label_values) in seen:
                continue  # an exposition must not repeat a series
            seen.add(tuple(label_values))
            family.add_metric(label_values, value)
        families.append(family)
    return families


class LatestSamplesCollector:
    """prometheus-client custom collector serving each sampler's most recent SampleSet."""

    def __init__(self) -> None:
        self._latest: dict[str, SampleSet] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def update(self, result: SampleSet) -> None:
        with self._lock:
            self._latest[result.collector] = result

    def latest(self) -> list[SampleSet]:
        with self._lock:
            return [self._latest[k] for k in sorted(self._latest)]

    def collect(self) -> Iterator:
        yield from metric_families(self.latest())


def render_text(collector: LatestSamplesCollector) -> bytes:
    """The Prometheus text exposition of ``collector`` alone (no process/python metrics)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


class MetricsServer:
    """``/metrics`` (text exposition), ``/healthz`` (alive) and ``/readyz`` (first sample done)."""

    def __init__(self, collector: LatestSamplesCollector, host: str, port: int):
        from prometheus_client import CONTENT_TYPE_LATEST

        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = render_text(owner.collector), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif path == "/readyz":
                    ready = owner.collector.ready.is_set()
                    body = b"ready\n" if ready else b"no sample yet\n"
                    ctype, code = "text/plain", 200 if ready else 503
                else:
                    body, ctype, code = b"not found: try /metrics\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:  # noqa: ANN002
                log.debug("http: " + fmt, *args)

        self.collector = collector
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvprof-metrics",
                                        daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
