"""`kvprof whatif`: a discrete-event model of the deployment, calibrated on a run's own traces."""

from __future__ import annotations

from pathlib import Path

import typer


def whatif(
    traces: str | None = typer.Option(
        None, "--traces", help="The run's traces (OTLP/Jaeger JSON file or folder), as for "
        "`kvprof report`. Needs engine step records (vllm.engine.step spans) unless "
        "--without-steps."),
    aiperf: Path | None = typer.Option(
        None, "--aiperf", help="The run's aiperf folder (one c<N> folder per concurrency): "
        "the load replayed (users, requests, ISL/OSL per request, warm-up)."),
    one_clock: bool = typer.Option(False, "--one-clock",
                                   help="Every process ran on one machine (as `make demo`)."),
    client_host: str | None = typer.Option(None, "--client-host",
                                           help="Host aiperf ran on (as for `kvprof report`)."),
    calibrate_on: str | None = typer.Option(
        None, "--calibrate-on", help="Levels to calibrate on, e.g. 1,4 (default: all but the "
        "highest, which is then predicted and checked against its measurement)."),
    levels: str | None = typer.Option(
        None, "--levels", help="Concurrency levels to predict the what-if at, e.g. 1,16,64 "
        "(default: the run's own)."),
    prefill: int | None = typer.Option(None, "--prefill", help="What-if: prefill workers."),
    decode: int | None = typer.Option(None, "--decode", help="What-if: decode workers."),
    aggregated: int | None = typer.Option(
        None, "--aggregated", help="What-if: aggregated workers (each runs prefill and decode "
        "steps with the calibrated costs)."),
    prefill_tp: int = typer.Option(1, "--prefill-tp", help="TP of a prefill worker (a label: "
                                   "service times are the calibrated engine's)."),
    decode_tp: int = typer.Option(1, "--decode-tp", help="TP of a decode worker (label)."),
    aggregated_tp: int = typer.Option(1, "--aggregated-tp", help="TP of an aggregated worker "
                                      "(label)."),
    max_batch: int | None = typer.Option(None, "--max-batch",
                                         help="Engines' max batch (vLLM --max-num-seqs)."),
    token_budget: int | None = typer.Option(
        None, "--token-budget", help="Engines' tokens per step (--max-num-batched-tokens)."),
    link_gbps: float | None = typer.Option(
        None, "--link-gbps", help="What-if: the KV link's rate in GB/s (gigaBYTES per second)."),
    microbench: Path | None = typer.Option(
        None, "--microbench", help="A `kvprof microbench --json` file: the measured link's "
        "wire rate (splits the traced transfers into wire and fixed parts)."),
    handshake_ms: float | None = typer.Option(
        None, "--handshake-ms", help="What-if: NIXL handshake per new prefill->decode pair."),
    prewarm: bool = typer.Option(False, "--prewarm-handshake",
                                 help="What-if: every NIXL pair handshaken before the load."),
    without_steps: bool = typer.Option(
        False, "--without-steps", help="Calibrate without engine step records: prefill from "
        "the compute spans, decode as a constant step (coarser)."),
    router: str = typer.Option("round_robin", "--router", help="round_robin or least_loaded."),
    given: Path | None = typer.Option(
        None, "--given", help="Instead of traces: a model given as inputs (kvprof.whatif/1 "
        "JSON: deployments, service times, load, measured table), e.g. "
        "examples/whatif/seed-h200.json."),
    fmt: str = typer.Option("text", "--format", help="text or json."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Predict TTFT for other loads and deployments from a run's own traces.

    The model: a closed-loop client replaying aiperf's load (users, requests, ISL/OSL), a
    frontend, N prefill and M decode engines (or K aggregated ones) with continuous batching
    under a max batch and a token budget, each step's time from the calibrated costs (prefill
    tokens, decode batch size), the KV link (wire rate, handshake per new pair), and the legs
    outside the engines drawn from the run's own requests. It first replays the measured
    levels (measured row beside predicted row, with the error), then the what-if you ask for
    (--prefill/--decode/--aggregated, --link-gbps, --prewarm-handshake, --levels). Every
    predicted figure is labelled as a prediction.
    """
    from kvprof.analysis.whatif.command import parse_levels, run_whatif_command
    from kvprof.inputs import option_number

    for opt, v in (("--prefill", prefill), ("--decode", decode), ("--aggregated", aggregated)):
        option_number(v, opt, minimum=0, strict=False)
    for opt, v in (("--link-gbps", link_gbps), ("--max-batch", max_batch),
                   ("--token-budget", token_budget), ("--prefill-tp", prefill_tp),
                   ("--decode-tp", decode_tp), ("--aggregated-tp", aggregated_tp)):
        option_number(v, opt, minimum=0)
    option_number(handshake_ms, "--handshake-ms", minimum=0, strict=False)
    if router not in ("round_robin", "least_loaded"):
        from kvprof.errors import UsageError

        raise UsageError(f"--router {router!r}", hint="Use round_robin or least_loaded.")
    kw = {} if given is not None else dict(
        traces=traces, aiperf=aiperf, one_clock=one_clock, client_host=client_host,
        calibrate_on=parse_levels(calibrate_on, "--calibrate-on"),
        workers={"prefill": prefill, "decode": decode, "aggregated": aggregated},
        tp={"prefill": prefill_tp, "decode": decode_tp, "aggregated": aggregated_tp},
        max_batch=max_batch, token_budget=token_budget, link_gbps=link_gbps,
        microbench=microbench, handshake_ms=handshake_ms, prewarm=prewarm,
        without_steps=without_steps, router=router)
    text, summary = run_whatif_command(given=given, fmt=fmt, out=out,
                                       levels=parse_levels(levels, "--levels"), **kw)
    if text:
        typer.echo(text)
    typer.echo(summary, err=True)
