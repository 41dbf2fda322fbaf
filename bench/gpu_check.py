"""One prepared check of every GPU path: microbench on CUDA, real NVML sampling, collector cost.

Run on a machine with an NVIDIA GPU and PyTorch (no network, no vLLM needed), in one command,
in well under 8 minutes; everything lands in one JSON (``gpu_check.json``) and a short text
summary (``gpu_check.txt``), each figure with its unit. The JSON is rewritten after every phase,
so a run cut short still brings back what it measured.

Phases, in order (each its own entry under ``phases``; a failing phase records its error and
the next one runs):

1. ``environment``: GPU model, driver, CUDA (driver and runtime), torch, NVML, clocks.
2. ``microbench``: ``kvprof microbench --tokens 4000`` for Qwen3-32B FP8, TP1 -> TP2 layouts
   into the same device, with each transport one GPU allows (``copy`` within the device;
   ``gloo`` two processes on the same GPU through host staging), bytes verified by the
   microbench itself. The collector samples NVML at 10 Hz all the while (phase 5 reads it).
3. ``efficiency``: paged gather+scatter against a raw device copy of the same bytes, side by
   side in one run (goal >= 0.85 of raw on a GPU).
4. ``hbm`` and ``pcie``: the HBM limit (a large device-to-device copy, CUDA events), and a
   known number of bytes moved host <-> device while NVML's PCIe byte counters are read before
   and after: the counters' unit is checked against bytes we know we moved.
5. ``nvml``: what the sampler read during phases 2-4: every field present (range, counter
   deltas and rates, wrap-arounds), or absent with the driver's reason; sanity of power,
   energy, temperature, memory, utilisation; NVLink (a single GPU has no peer: said so).
6. ``collector_cost``: the whole collector's tick (every sampler, real NVML calls) timed alone,
   CPU time per tick against the budget of 1% of one core at 10 Hz.

Without a GPU it prints one line saying so and what it would run, and exits 4. ``--device cpu``
is the dry run: the same phases on the CPU (NVML then reports its absence), so the whole path is
exercised here before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_NO_GPU = 4  # kvprof's "needed resource absent"
SCHEMA = "kvprof.gpu_check/1"
BUDGET_CORE_FRACTION = 0.01  # the collector's budget: 1% of one core
GIB = 1 << 30
# Expected ranges of what NVML reports on a data-centre GPU; outside them a value is suspect.
SANE = {
    "kvprof_gpu_power_watts": (1.0, 1500.0),
    "kvprof_gpu_temperature_celsius": (5.0, 110.0),
    "kvprof_gpu_utilization_ratio": (0.0, 1.0),
    "kvprof_gpu_memory_utilization_ratio": (0.0, 1.0),
}
UNITS = {
    "kvprof_gpu_power_watts": "W", "kvprof_gpu_energy_joules": "J",
    "kvprof_gpu_temperature_celsius": "degC", "kvprof_gpu_utilization_ratio": "ratio",
    "kvprof_gpu_memory_utilization_ratio": "ratio", "kvprof_gpu_memory_used_bytes": "B",
    "kvprof_gpu_memory_total_bytes": "B", "kvprof_gpu_pcie_tx_bytes": "B",
    "kvprof_gpu_pcie_rx_bytes": "B", "kvprof_nvlink_tx_bytes": "B", "kvprof_nvlink_rx_bytes": "B",
}


def _load_pynvml() -> tuple[Any, str | None]:
    try:
        import pynvml

        return pynvml, None
    except ImportError as err:
        return None, f"nvidia-ml-py is not installed ({err})"


# --- phase 1: where we are ------------------------------------------------------------------

def probe_environment(nvml: Any, nvml_missing: str | None) -> dict:
    """GPU model, driver, CUDA and library versions; what torch and NVML each see."""
    import kvprof

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "kvprof": kvprof.__version__,
                           "kvprof_from": str(Path(kvprof.__file__).parent)}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_runtime"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        env["gpus_torch"] = torch.cuda.device_count() if env["cuda_available"] else 0
        if env["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            env["gpu_name"] = p.name
            env["gpu_memory_bytes"] = int(p.total_memory)
            env["compute_capability"] = f"{p.major}.{p.minor}"
            env["multiprocessors"] = p.multi_processor_count
    except ImportError as err:
        env["torch"] = None
        env["torch_missing"] = str(err)
        env["cuda_available"] = False
    env["nvml"] = nvml_facts(nvml, nvml_missing)
    return env


def nvml_facts(nvml: Any, missing: str | None) -> dict:
    """Driver, NVML and CUDA driver versions and each GPU's identity and clocks, or why not."""
    if nvml is None:
        return {"available": False, "reason": missing}
    try:
        nvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, driver not loaded, ...
        return {"available": False, "reason": f"nvmlInit failed: {err}"}
    out: dict[str, Any] = {"available": True}
    for key, call in (("driver", "nvmlSystemGetDriverVersion"),
                      ("nvml_version", "nvmlSystemGetNVMLVersion"),
                      ("cuda_driver", "nvmlSystemGetCudaDriverVersion_v2")):
        out[key] = _nvml_call(nvml, call)
    if isinstance(out["cuda_driver"], int):  # 12040 -> "12.4"
        v = out["cuda_driver"]
        out["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    gpus = []
    count = _nvml_call(nvml, "nvmlDeviceGetCount")
    for i in range(count if isinstance(count, int) else 0):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        gpus.append({
            "index": i, "name": _nvml_call(nvml, "nvmlDeviceGetName", h),
            "uuid": _nvml_call(nvml, "nvmlDeviceGetUUID", h),
            "sm_clock_mhz": _nvml_call(nvml, "nvmlDeviceGetClockInfo", h,
                                       getattr(nvml, "NVML_CLOCK_SM", 1)),
            "mem_clock_mhz": _nvml_call(nvml, "nvmlDeviceGetClockInfo", h,
                                        getattr(nvml, "NVML_CLOCK_MEM", 2)),
            "max_sm_clock_mhz": _nvml_call(nvml, "nvmlDeviceGetMaxClockInfo", h,
                                           getattr(nvml, "NVML_CLOCK_SM", 1)),
            "power_limit_w": _scaled(_nvml_call(nvml, "nvmlDeviceGetEnforcedPowerLimit", h),
                                     1e-3),
        })
    out["gpus"] = gpus
    return out


def _nvml_call(nvml: Any, name: str, *args: Any) -> Any:
    """One NVML call; a missing function or an NVML error becomes its reason, as a string."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return f"n/a: this nvidia-ml-py has no {name}"
    try:
        value = fn(*args)
    except Exception as err:  # noqa: BLE001 - every NVMLError subclass, reported as data
        return f"n/a: {err}"
    return value.decode() if isinstance(value, bytes) else value


def _scaled(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, (int, float)) else value


def what_it_would_run(args: argparse.Namespace) -> str:
    return (f"microbench {args.tokens} tokens qwen3-32b fp8 TP1->TP2 (copy, gloo) on cuda, "
            f"paged-vs-raw efficiency, HBM and PCIe probes, {args.collect_s:.0f} s of NVML "
            "sampling at 10 Hz, collector tick cost")


# --- phase 2/3/4: moving bytes on the device -------------------------------------------------

def run_microbench(device: str, tokens: int, iters: int, warmup: int,
                   transports: list[str]) -> dict:
    """kvprof's own microbench per transport; each result's key figures, or its error."""
    from kvprof.errors import KvprofError
    from kvprof.microbench.runner import MicrobenchOptions
    from kvprof.microbench.runner import run_microbench as microbench

    out: dict[str, Any] = {}
    for transport in transports:
        t0 = time.monotonic()
        try:
            r = microbench(MicrobenchOptions(tokens=tokens, transport=transport, device=device,
                                             iters=iters, warmup=warmup, prefill_tp=1,
                                             decode_tp=2))
        except KvprofError as err:
            out[transport] = {"error": err.message, "hint": err.hint}
            continue
        except Exception as err:  # noqa: BLE001 - a GPU path that breaks is the finding
            out[transport] = {"error": f"{type(err).__name__}: {err}",
                              "traceback": traceback.format_exc(limit=6)}
            continue
        steps = r["steps"]
        out[transport] = {
            "device": r["device"], "device_name": r["environment"]["device_name"],
            "bytes": r["bytes_moved"], "descriptors": r["descriptors"],
            "descriptor_bytes": r["descriptor_bytes"],
            # The microbench raises VerificationError when bytes do not arrive exactly.
            "bytes_verified": True,
            "steps_ms": {k: steps[k]["median_ms"] for k in
                         ("setup", "gather", "wire", "scatter", "per_descriptor", "total")},
            "total_gbps": steps["total"]["gbps"], "limit_gbps": r["limit"]["gbps"],
            "pct_of_limit": steps["total"]["pct_of_limit"],
            "wall_s": time.monotonic() - t0,
        }
    return out


def run_efficiency(device: str, tokens: int, iters: int) -> dict:
    from microbench_efficiency import measure_efficiency  # bench/ sits beside this file

    r = measure_efficiency(tokens=tokens, iters=iters, warmup=2, device=device)
    r["met"] = r["ratio"] >= r["goal"]
    return r


def measure_hbm(device: str, nbytes: int, iters: int = 10) -> dict:
    """A contiguous device-to-device copy: bytes copied per second, and HBM traffic (read+write)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(7)
    times = []
    for i in range(iters + 2):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            took = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            took = time.perf_counter() - t0
        if i >= 2:
            times.append(took)
    ok = bool(torch.equal(dst[:: max(1, nbytes // 4096)], src[:: max(1, nbytes // 4096)]))
    med = sorted(times)[len(times) // 2]
    del src, dst
    return {"device": device, "bytes": nbytes, "median_s": med, "copy_gbps": nbytes / med / 1e9,
            "traffic_gbps": 2 * nbytes / med / 1e9, "bytes_verified": ok,
            "method": "torch copy_ of one contiguous buffer, CUDA events, median of "
                      f"{iters}; traffic counts bytes read and written"}


def pcie_counters(nvml: Any) -> list[tuple[float, float]] | None:
    """(tx, rx) of each GPU from NVML's PCIe byte-counter fields, or None without NVML."""
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            answer = nvml.nvmlDeviceGetFieldValues(h, [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES,
                                                       nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])
            from kvprof.collectors.nvml import field_values

            values, codes = field_values(answer)
            if any(c != nvml.NVML_SUCCESS for c in codes):
                return None
            out.append((values[0], values[1]))
    except Exception:  # noqa: BLE001 - no NVML or no field support: the probe says so
        return None
    return out


def pcie_probe(device: str, nvml: Any, nbytes: int, rounds: int = 4) -> dict:
    """Move a known number of bytes host->device and back; compare with NVML's PCIe counters."""
    if not device.startswith("cuda"):
        return {"skipped": "no CUDA device: nothing crosses PCIe"}
    import torch

    before = pcie_counters(nvml) if nvml is not None else None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(3)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(rounds):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h_s = time.perf_counter() - t0
    time.sleep(0.2)  # NVML's counters are refreshed by the driver, not on every byte
    after = pcie_counters(nvml) if nvml is not None else None
    moved = nbytes * rounds
    out: dict[str, Any] = {"bytes_each_way": moved, "h2d_gbps": moved / h2d_s / 1e9,
                           "d2h_gbps": moved / d2h_s / 1e9}
    if before is None or after is None:
        out["counters"] = "absent: NVML gave no PCIe byte counters here"
        return out
    gpu = int(str(device).rpartition(":")[2] or 0)
    tx = after[gpu][0] - before[gpu][0]
    rx = after[gpu][1] - before[gpu][1]
    # The GPU receives the host->device bytes (rx) and transmits the device->host ones (tx);
    # counters also carry protocol overhead and other traffic, so expect a bit above 1.0.
    out.update({"counter_rx_delta": rx, "counter_tx_delta": tx,
                "rx_over_moved": rx / moved, "tx_over_moved": tx / moved,
                "counter_unit_ok": 0.9 <= rx / moved <= 1.5 and 0.9 <= tx / moved <= 1.5,
                "wrapped": tx < 0 or rx < 0})
    return out


# --- phase 5: what the sampler read ------------------------------------------------------------

class SampleLog:
    """A collector sink that keeps every SampleSet of the run in memory (seconds of data)."""

    def __init__(self) -> None:
        self.sets: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, result: Any, sticky: bool) -> None:
        with self._lock:
            self.sets.append(result)


def nvml_schedule(nvml: Any) -> list[Any]:
    """The collector's NVML samplers (GPU values, NVLink, link state, GPU processes)."""
    from kvprof.collectors.daemon import NVLINK_STATE_EVERY_S, PROCESS_EVERY_S, Scheduled
    from kvprof.collectors.nvlink import NvlinkSampler, NvlinkStateSampler
    from kvprof.collectors.nvml import GpuProcessSampler, GpuSampler, NvmlSession

    session = NvmlSession(nvml)
    return [Scheduled(GpuSampler(session)), Scheduled(NvlinkSampler(session)),
            Scheduled(NvlinkStateSampler(session), NVLINK_STATE_EVERY_S),
            Scheduled(GpuProcessSampler(session), PROCESS_EVERY_S)]


class BackgroundCollector:
    """The collector's own loop at 10 Hz in a thread, while the device phases run."""

    def __init__(self, nvml: Any, interval: float = 0.1):
        from kvprof.collectors.daemon import CollectorLoop

        self.log = SampleLog()
        self.loop = CollectorLoop(nvml_schedule(nvml), interval, [self.log])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop,), daemon=True,
                                       name="kvprof-collector")
        self.started = 0.0

    def __enter__(self) -> BackgroundCollector:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def summarize_samples(sets: list[Any]) -> dict:
    """Per series: count, range, counter delta/rate and wrap-arounds; absences with reasons."""
    series: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    absent: dict[tuple[str, str], str] = {}
    for s in sets:
        for sample in s.all_samples():
            series.setdefault((sample.metric, sample.entity), []).append(
                (s.ts, float(sample.value), bool(sample.counter)))
        for nd in s.no_data:
            absent.setdefault((nd.metric, nd.entity), nd.reason)
    fields: dict[str, Any] = {}
    problems: list[str] = []
    for (metric, entity), points in sorted(series.items()):
        values = [v for _, v, _ in points]
        entry: dict[str, Any] = {"samples": len(points), "min": min(values), "max": max(values),
                                 "unit": UNITS.get(metric, "")}
        if points[0][2]:  # a running counter: its rate, and whether it ever went backwards
            steps = [(b[1] - a[1], b[0] - a[0]) for a, b in zip(points, points[1:], strict=False)]
            entry["delta"] = values[-1] - values[0]
            entry["wraps"] = sum(1 for d, _ in steps if d < 0)
            rates = [d / dt for d, dt in steps if dt > 0 and d >= 0]
            entry["max_rate_per_s"] = max(rates) if rates else None
            entry["mean_rate_per_s"] = (entry["delta"] / (points[-1][0] - points[0][0])
                                        if len(points) > 1 and points[-1][0] > points[0][0]
                                        else None)
            if entry["wraps"]:
                problems.append(f"{metric} {entity}: counter went backwards {entry['wraps']}x")
        lo_hi = SANE.get(metric)
        if lo_hi and not (lo_hi[0] <= entry["min"] and entry["max"] <= lo_hi[1]):
            problems.append(f"{metric} {entity}: {entry['min']}..{entry['max']} outside "
                            f"{lo_hi[0]}..{lo_hi[1]} {entry['unit']}")
        fields[f"{metric}{{{entity}}}"] = entry
    used = _last(series, "kvprof_gpu_memory_used_bytes")
    for entity, total in _last(series, "kvprof_gpu_memory_total_bytes").items():
        if entity in used and used[entity] > total:
            problems.append(f"memory used {used[entity]} > total {total} on {entity}")
    nvlink_series = [k for k in fields if k.startswith("kvprof_nvlink_")]
    nvlink_note = None
    if not nvlink_series:
        reasons = sorted({r for (m, _), r in absent.items()
                          if m.startswith("kvprof_nvlink") or m == "*"})
        nvlink_note = ("no NVLink series: " + ("; ".join(reasons) if reasons else
                       "this GPU reports no active NVLink links (a single GPU has no NVLink peer)"))
    return {
        "ticks": len({s.ts for s in sets if s.collector == "nvml"}),
        "fields_present": fields,
        "fields_absent": [{"metric": m, "entity": e, "reason": r}
                          for (m, e), r in sorted(absent.items()) if (m, e) not in series],
        "nvlink": nvlink_note or f"{len(nvlink_series)} NVLink series",
        "problems": problems,
    }


def _last(series: dict, metric: str) -> dict[str, float]:
    return {e: pts[-1][1] for (m, e), pts in series.items() if m == metric}


# --- phase 6: the collector's own cost ----------------------------------------------------------

def collector_cost(nvml: Any, ticks: int = 100, interval: float = 0.1) -> dict:
    """The full collector schedule ticked alone: CPU time per tick against 1% of a core."""
    from kvprof.collectors.daemon import CollectorLoop, build_samplers

    schedule, session = build_samplers(nvml=nvml, kubelet_socket=None, node="gpu-check")
    loop = CollectorLoop(schedule, interval, [])
    loop.tick(0, everything=True)  # first tick: discovery (NVML init, links), not steady state
    per_sampler: dict[str, float] = {}
    cpu = []
    for k in range(1, ticks + 1):
        c0 = time.thread_time()
        for result in loop.tick(k):
            per_sampler[result.collector] = per_sampler.get(result.collector, 0.0) \
                + result.duration_s
        cpu.append(time.thread_time() - c0)
    session.shutdown()
    mean = sum(cpu) / len(cpu)
    share = mean / interval
    return {"ticks": ticks, "interval_s": interval, "cpu_ms_per_tick": mean * 1e3,
            "core_fraction": share, "budget_core_fraction": BUDGET_CORE_FRACTION,
            "within_budget": share <= BUDGET_CORE_FRACTION,
            "wall_ms_per_tick_by_sampler": {k: v / ticks * 1e3 for k, v in
                                            sorted(per_sampler.items())}}


# --- the run -------------------------------------------------------------------------------------

class Check:
    """Runs the phases in order under one deadline; writes the JSON after each phase."""

    def __init__(self, out_dir: Path, deadline_s: float):
        self.out_dir = out_dir
        self.deadline = time.monotonic() + deadline_s
        self.doc: dict[str, Any] = {"schema": SCHEMA, "phases": {}, "errors": {}}

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.doc["errors"][name] = "skipped: the check's time budget was spent"
            self.save()
            return None
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - a failing phase is a finding, not the end
            self.doc["errors"][name] = f"{type(err).__name__}: {err}"
            self.doc["phases"].setdefault("tracebacks", {})[name] = traceback.format_exc(limit=8)
            value = None
        else:
            self.doc["phases"][name] = value
        self.doc.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 2)
        self.save()
        return value

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "gpu_check.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)


def summary_text(doc: dict) -> str:
    """The short text summary: one line per figure, each with its unit."""
    p, lines = doc["phases"], []
    env = p.get("environment") or {}
    nv = env.get("nvml") or {}
    lines.append(f"GPU: {env.get('gpu_name', 'none')} | driver {nv.get('driver', 'n/a')} | "
                 f"CUDA driver {nv.get('cuda_driver', 'n/a')}, runtime "
                 f"{env.get('cuda_runtime', 'n/a')} | torch {env.get('torch')} | "
                 f"Python {env.get('python')}")
    for t, r in (p.get("microbench") or {}).items():
        if "error" in r:
            lines.append(f"microbench {t}: error: {r['error']}")
            continue
        s = r["steps_ms"]
        lines.append(
            f"microbench {t} ({r['bytes']:,} B, {r['descriptors']:,} descriptors of "
            f"{r['descriptor_bytes']:,} B, bytes verified): total {s['total']:.2f} ms = "
            f"{r['total_gbps']:.1f} GB/s ({r['pct_of_limit'] or 0:.0f}% of the raw copy's "
            f"{r['limit_gbps']:.1f} GB/s); gather {s['gather']:.2f} ms, wire {s['wire']:.2f} ms, "
            f"scatter {s['scatter']:.2f} ms, setup {s['setup']:.1f} ms")
    eff = p.get("efficiency")
    if eff:
        lines.append(f"paged gather+scatter vs raw copy: {eff['ratio']:.2f} (goal >= "
                     f"{eff['goal']:.2f}: {'met' if eff['met'] else 'NOT met'}); gather "
                     f"{eff['gbps']['gather']:.1f} GB/s, scatter {eff['gbps']['scatter']:.1f} "
                     f"GB/s, raw {eff['gbps']['raw']:.1f} GB/s")
    hbm = p.get("hbm")
    if hbm:
        kind = "HBM" if hbm["device"].startswith("cuda") else "memory"
        lines.append(f"{kind} limit: copy {hbm['copy_gbps']:.0f} GB/s ({hbm['traffic_gbps']:.0f} "
                     f"GB/s read+write) over {hbm['bytes'] / GIB:.1f} GiB")
    pcie = p.get("pcie")
    if pcie:
        if "skipped" in pcie:
            lines.append(f"PCIe probe: skipped ({pcie['skipped']})")
        else:
            unit = (f"NVML counters rx/moved {pcie['rx_over_moved']:.3f}, tx/moved "
                    f"{pcie['tx_over_moved']:.3f} (unit ok: {pcie['counter_unit_ok']})"
                    if "rx_over_moved" in pcie else pcie.get("counters", ""))
            lines.append(f"PCIe: H2D {pcie['h2d_gbps']:.1f} GB/s, D2H {pcie['d2h_gbps']:.1f} "
                         f"GB/s; {unit}")
    nvml = p.get("nvml")
    if nvml:
        lines.append(f"NVML sampling: {nvml['ticks']} ticks, {len(nvml['fields_present'])} "
                     f"series present, {len(nvml['fields_absent'])} absent; {nvml['nvlink']}")
        for a in nvml["fields_absent"][:8]:
            lines.append(f"  absent {a['metric']} {a['entity']}: {a['reason']}")
        for problem in nvml["problems"]:
            lines.append(f"  PROBLEM {problem}")
    cost = p.get("collector_cost")
    if cost:
        lines.append(f"collector tick: {cost['cpu_ms_per_tick']:.3f} ms CPU per tick = "
                     f"{100 * cost['core_fraction']:.2f}% of a core at "
                     f"{1 / cost['interval_s']:.0f} Hz (budget "
                     f"{100 * cost['budget_core_fraction']:.0f}%: "
                     f"{'met' if cost['within_budget'] else 'NOT met'})")
    for name, err in doc["errors"].items():
        lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto/cuda: the GPU (exit 4 without one); cpu: the dry run")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: $OUT when set, else out/gpu-check)")
    ap.add_argument("--tokens", type=int, default=4000, help="prompt tokens of Qwen3-32B FP8 KV")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per microbench step")
    ap.add_argument("--transports", default="copy,gloo",
                    help="microbench transports to try (comma-separated)")
    ap.add_argument("--hbm-gib", type=float, default=4.0, help="HBM probe buffer, GiB")
    ap.add_argument("--pcie-gib", type=float, default=1.0, help="PCIe probe buffer, GiB")
    ap.add_argument("--collect-s", type=float, default=10.0,
                    help="least seconds of NVML sampling around the device phases")
    ap.add_argument("--cost-ticks", type=int, default=100, help="collector ticks timed alone")
    ap.add_argument("--deadline-s", type=float, default=420.0,
                    help="phases not started by then are skipped (the lease is short)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("out/gpu-check")
    return args


def main(argv: list[str] | None = None, nvml: Any = None) -> int:
    """Run every phase; ``nvml`` replaces the real pynvml (tests replay recorded data)."""
    args = parse_args(argv)
    missing = None
    if nvml is None:
        nvml, missing = _load_pynvml()
    env = probe_environment(nvml, missing)
    if args.device != "cpu" and not env.get("cuda_available"):
        why = env.get("torch_missing") or (f"torch {env.get('torch')} sees no CUDA device")
        print(f"gpu-check: no NVIDIA GPU here ({why}; NVML: "
              f"{env['nvml'].get('reason') or 'ok'}); on a GPU it would run: "
              f"{what_it_would_run(args)}. Dry run: --device cpu.", file=sys.stderr)
        return EXIT_NO_GPU
    device = "cuda" if args.device != "cpu" else "cpu"
    dev = "cuda:0" if device == "cuda" else "cpu"
    check = Check(args.out, args.deadline_s)
    check.doc["args"] = {k: str(v) for k, v in vars(args).items()}
    check.doc["dry_run"] = device == "cpu"
    check.phase("environment", lambda: env)
    transports = [t for t in args.transports.split(",") if t]
    with BackgroundCollector(nvml) as collector:
        check.phase("microbench", lambda: run_microbench(device, args.tokens, args.iters, 3,
                                                         transports))
        check.phase("efficiency", lambda: run_efficiency(device, args.tokens, args.iters))
        check.phase("hbm", lambda: measure_hbm(dev, int(args.hbm_gib * GIB)))
        check.phase("pcie", lambda: pcie_probe(dev, nvml, int(args.pcie_gib * GIB)))
        rest = args.collect_s - (time.monotonic() - collector.started)
        if rest > 0:
            time.sleep(rest)
    check.phase("nvml", lambda: summarize_samples(collector.log.sets))
    check.phase("collector_cost", lambda: collector_cost(nvml, args.cost_ticks))
    text = summary_text(check.doc)
    (args.out / "gpu_check.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0 if not check.doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
