"""Run the microbench: pick device and transport, time every step, sweep, write the JSON."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvprof.errors import KvprofError, ResourceAbsentError, UsageError
from kvprof.microbench.memory import check_memory
from kvprof.model import KvGeometry, resolve_geometry

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "copy", "gloo", "nccl", "nixl")
DEVICES = ("auto", "cpu", "cuda")
# Test hook: "STEP:RUN" flips one delivered byte in timed run RUN of STEP (total or
# per_descriptor), to prove that verification fails the command.
CORRUPT_ENV = "KVPROF_MICROBENCH_CORRUPT"

# One copy per descriptor costs ~1 s per run at 64,000 descriptors (NIXL over UCX loopback
# on a CPU), so per_descriptor takes at most this many timed runs; the JSON's "samples"
# and the table say how many it had.
PER_DESCRIPTOR_MAX_RUNS = 5

Progress = Callable[[str, int, int], None]  # (label, done, total)


@dataclass
class MicrobenchOptions:
    """Everything one `kvprof microbench` invocation asks for."""

    tokens: int = 4000
    model: str | None = "qwen3-32b"
    model_config: str | Path | None = None
    kv_dtype: str = "fp8"
    block_size: int = 16
    prefill_tp: int = 1
    decode_tp: int = 2
    transport: str = "auto"
    device: str = "auto"
    iters: int = 20
    warmup: int = 3
    sweep: list[int] = field(default_factory=list)
    threads: int | None = None
    seed: int = 0
    corrupt: tuple[str, int] | None = None  # test hook, see CORRUPT_ENV

    def geometry_args(self) -> dict:
        return {
            "model": self.model,
            "model_config": self.model_config,
            "kv_dtype": self.kv_dtype,
            "block_size": self.block_size,
        }


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda:0'; --device cuda without a usable GPU is a missing resource."""
    import torch

    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}", hint="Use auto, cpu or cuda.")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ResourceAbsentError(
            "--device cuda asked for, but torch sees no CUDA device here",
            hint="Run on a GPU host with a CUDA build of torch, or use --device cpu.",
        )
    return "cuda:0" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"


def resolve_transport(transport: str, device: str) -> tuple[str, str]:
    """The transport to use and why; a named one that cannot work here exits 4."""
    import torch
    import torch.distributed as dist

    from kvprof.microbench.inprocess import NIXL_HINT, nixl_usable

    if transport not in TRANSPORTS:
        raise UsageError(
            f"unknown --transport {transport!r}", hint="Use one of: " + ", ".join(TRANSPORTS)
        )
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    nccl_ok = dist.is_available() and dist.is_nccl_available() and gpus >= 2
    if transport == "nccl" and not nccl_ok:
        raise ResourceAbsentError(
            f"nccl needs two CUDA devices and a CUDA build of torch; this run sees {gpus}",
            hint="Run on a host with >= 2 GPUs and --device cuda, or use --transport gloo/nixl.",
        )
    if transport == "gloo" and not (dist.is_available() and dist.is_gloo_available()):
        raise ResourceAbsentError(
            "this torch build has no gloo backend", hint="Use --transport copy."
        )
    nixl_ok, nixl_why = nixl_usable()
    if transport == "nixl" and not nixl_ok:
        raise ResourceAbsentError(nixl_why, hint=NIXL_HINT)
    if transport != "auto":
        return transport, "requested"
    # Production hand-offs in vLLM / Dynamo go through NIXL, so it is the most telling path.
    if nixl_ok:
        return "nixl", "auto: nixl imports (the path vLLM's NixlConnector takes)"
    if nccl_ok:
        return "nccl", f"auto: nixl unusable ({nixl_why}); {gpus} GPUs for nccl"
    return "gloo", f"auto: nixl unusable ({nixl_why}); no second GPU, so two processes over gloo"


def _session(layout, transport: str, device: str, threads: int, seed: int):
    from kvprof.microbench.engine import make_engine

    if transport in ("gloo", "nccl"):
        from kvprof.microbench.twoproc import TwoProcessSession

        return TwoProcessSession(layout, device, transport, threads, seed)
    from kvprof.microbench.inprocess import CopyWire, InProcessSession, NixlWire

    wire = NixlWire(device) if transport == "nixl" else CopyWire()
    engine = make_engine(device, threads)
    try:
        return InProcessSession(layout, engine, device, wire, seed)
    except BaseException:
        engine.close()
        raise


def measure(
    geometry: KvGeometry,
    opts: MicrobenchOptions,
    device: str,
    transport: str,
    threads: int,
    progress: Progress | None = None,
) -> dict:
    """Time one token count: setup once, then gather/wire/scatter/total and per_descriptor."""
    from kvprof.microbench.layout import build_layout
    from kvprof.microbench.results import Stats, gbps, step_entry

    layout = build_layout(geometry, opts.prefill_tp, opts.decode_tp, opts.seed)
    runs = opts.warmup + opts.iters
    total_work = 1 + runs + min(opts.warmup, 1) + min(opts.iters, PER_DESCRIPTOR_MAX_RUNS)
    label = f"{geometry.tokens} tokens, {transport}"
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(label, done, total_work)

    if progress:
        progress(label, 0, total_work)
    session = _session(layout, transport, device, threads, opts.seed)
    try:
        parts = session.setup()
        tick()
        samples: dict[str, list[float]] = {k: [] for k in ("gather", "wire", "scatter", "total")}
        per_descriptor: list[float] = []
        raw: list[float] = []
        for i in range(runs):
            run = i - opts.warmup
            times = session.run_transfer("total", run, opts.corrupt == ("total", run))
            raw_s = session.raw_copy()  # interleaved, so both see the same machine load
            if run >= 0:
                for k in samples:
                    samples[k].append(times[k])
                raw.append(raw_s)
            tick()
        pd_warmup = min(opts.warmup, 1)
        for i in range(pd_warmup + min(opts.iters, PER_DESCRIPTOR_MAX_RUNS)):
            run = i - pd_warmup
            took = session.run_per_descriptor(
                "per_descriptor", run, opts.corrupt == ("per_descriptor", run)
            )
            if run >= 0:
                per_descriptor.append(took)
            tick()
    finally:
        session.close()

    nbytes = layout.bytes_moved
    limit = Stats.of_seconds(raw)
    limit_gbps = gbps(nbytes, limit.median_ms)
    steps = {"setup": step_entry(Stats.of_seconds([parts["total_s"]]), 0, None)}
    steps["setup"]["parts_ms"] = {
        k.removesuffix("_s"): v * 1e3 for k, v in parts.items() if k != "total_s"
    }
    for name in ("gather", "wire", "scatter"):
        steps[name] = step_entry(Stats.of_seconds(samples[name]), nbytes, limit_gbps)
    steps["per_descriptor"] = step_entry(Stats.of_seconds(per_descriptor), nbytes, limit_gbps)
    steps["per_descriptor"]["scaled"] = session.per_descriptor_note
    for name, method in session.methods.items():
        steps[name]["method"] = method
    steps["total"] = step_entry(Stats.of_seconds(samples["total"]), nbytes, limit_gbps)
    return {
        "geometry": geometry.to_dict(opts.prefill_tp, opts.decode_tp),
        "bytes_moved": nbytes,
        "descriptors": layout.descriptors_total,
        "descriptor_bytes": layout.unit_bytes,
        "steps": steps,
        "limit": {
            "median_ms": limit.median_ms,
            "p10_ms": limit.p10_ms,
            "p90_ms": limit.p90_ms,
            "gbps": limit_gbps,
            "path": f"raw contiguous copy of the same bytes on {device}, same run",
        },
    }


def run_microbench(
    opts: MicrobenchOptions, progress: Progress | None = None, partial: dict | None = None
) -> dict:
    """The whole measurement as the JSON-ready dict described in kvprof.microbench.results.

    `partial`, when given, is filled as results arrive, so a caller can keep what was
    measured before a failure.
    """
    # Option spelling first: a typo exits 2 before torch is even imported.
    if opts.transport not in TRANSPORTS:
        raise UsageError(
            f"unknown --transport {opts.transport!r}", hint="Use one of: " + ", ".join(TRANSPORTS)
        )
    if opts.device not in DEVICES:
        raise UsageError(f"unknown --device {opts.device!r}", hint="Use auto, cpu or cuda.")
    if opts.iters < 1:
        raise UsageError(f"--iters must be >= 1, got {opts.iters}")
    if opts.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {opts.warmup}")
    geometry = resolve_geometry(opts.tokens, **opts.geometry_args())
    geometry.descriptor_plan(opts.prefill_tp, opts.decode_tp)  # TP errors before any work
    for tokens in opts.sweep:
        resolve_geometry(tokens, **opts.geometry_args())
    import torch

    from kvprof.microbench.results import SCHEMA, environment, fit_growth, link_table

    device = resolve_device(opts.device)
    transport, reason = resolve_transport(opts.transport, device)
    log.info("transport %s (%s), device %s", transport, reason, device)
    # Before any allocation: the largest point must fit in memory (else exit 4, saying what does).
    check_memory(opts.geometry_args(), max(opts.sweep or [opts.tokens]), opts.prefill_tp,
                 opts.decode_tp, transport, device, sweep=bool(opts.sweep))
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    out = partial if partial is not None else {}
    out.update(
        {
            "schema": SCHEMA,
            "transport": transport,
            "transport_reason": reason,
            "device": device,
            "iters": opts.iters,
            "warmup": opts.warmup,
            "environment": environment(device, transport, threads),
            "sweep": None,
        }
    )
    counts = opts.sweep or [opts.tokens]
    # The detailed breakdown is for --tokens when the sweep includes it, else the largest.
    main_tokens = opts.tokens if opts.tokens in counts else max(counts)
    points = []
    if opts.sweep:
        out["sweep"] = {"points": points, "fit": None}
    for tokens in counts:
        g = resolve_geometry(tokens, **opts.geometry_args())
        one = measure(g, opts, device, transport, threads, progress)
        if tokens == main_tokens:
            out.update(one)
        points.append(
            {
                "tokens": tokens,
                "bytes": one["bytes_moved"],
                "total_ms": one["steps"]["total"]["median_ms"],
                "wire_ms": one["steps"]["wire"]["median_ms"],
                "per_descriptor_ms": one["steps"]["per_descriptor"]["median_ms"],
                "gbps": one["steps"]["total"]["gbps"],
            }
        )
        if opts.sweep:
            out["sweep"]["fit"] = fit_growth(points)
    out["links"] = link_table(opts.geometry_args(), out["steps"]["total"]["gbps"], transport)
    return out


def _parse_sweep(sweep: str | None) -> list[int]:
    if not sweep:
        return []
    try:
        counts = [int(x) for x in sweep.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(
            f"--sweep must be comma-separated token counts, got {sweep!r}",
            hint="For example: --sweep 500,1000,2000,4000,8000",
        ) from None
    if not counts or min(counts) <= 0:
        raise UsageError(f"--sweep token counts must be >= 1, got {sweep!r}")
    return sorted(set(counts))


def _parse_corrupt() -> tuple[str, int] | None:
    raw = os.environ.get(CORRUPT_ENV)
    if not raw:
        return None
    step, _, run = raw.partition(":")
    try:
        return step, int(run or 0)
    except ValueError:
        raise UsageError(f"{CORRUPT_ENV} must look like total:0, got {raw!r}") from None


def run_microbench_command(
    tokens: int,
    model: str,
    model_config: Path | None,
    kv_dtype: str,
    block_size: int,
    prefill_tp: int,
    decode_tp: int,
    transport: str,
    device: str,
    iters: int,
    warmup: int,
    sweep: str | None,
    json_out: Path | None,
    quiet: bool,
) -> None:
    """The body of `kvprof microbench`: measure, print the tables, write --json."""
    from rich.console import Console

    from kvprof.microbench.render import ProgressBar, render
    from kvprof.microbench.results import write_json

    if json_out is not None:
        from kvprof.outputs import check_output

        check_output(json_out, "--json")  # before the measurement, not after it
    opts = MicrobenchOptions(
        tokens=tokens,
        model=model,
        model_config=model_config,
        kv_dtype=kv_dtype,
        block_size=block_size,
        prefill_tp=prefill_tp,
        decode_tp=decode_tp,
        transport=transport,
        device=device,
        iters=iters,
        warmup=warmup,
        sweep=_parse_sweep(sweep),
        corrupt=_parse_corrupt(),
    )
    out = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    err = Console(stderr=True, highlight=False)
    partial: dict = {}
    bar = ProgressBar(err, quiet=quiet)
    try:
        with bar:
            result = run_microbench(opts, progress=bar.update, partial=partial)
    except KvprofError as exc:
        if json_out and (partial.get("steps") or (partial.get("sweep") or {}).get("points")):
            partial["error"] = exc.message
            write_json(json_out, partial)
            err.print(f"Partial results written to {json_out}")
        raise
    render(out, result)
    if json_out:
        write_json(json_out, result)
        out.print(f"\nWrote {json_out}")
