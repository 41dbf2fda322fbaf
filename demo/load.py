"""Drive a served model with aiperf (the seed's load generator), one artifact dir per level."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from demo.procs import ProcessManager, log_tail
from kvprof.errors import KvprofError, ResourceAbsentError

log = logging.getLogger("kvprof.demo.load")

AIPERF_SUMMARY = "profile_export_aiperf.json"


@dataclass(frozen=True)
class LoadPlan:
    """The same load for both deployments: the seed's ISL/OSL sweep, scaled to a tiny model."""

    concurrencies: tuple[int, ...] = (1, 4, 16)
    requests_per_level: int = 8
    input_tokens: int = 512
    output_tokens: int = 16
    seed: int = 4000  # same synthetic prompts for agg and disagg
    # One request before each level's measurement: a fresh engine's first steps on a CPU
    # (kernel set-up for new shapes) cost seconds the seed's warm GPUs never paid. It is
    # traced like every other (the first contact's NIXL handshake stays in the report),
    # but aiperf leaves it out of its summaries, so `kvprof compare` sees warm engines.
    warmup: int = 1

    def requests_at(self, concurrency: int) -> int:
        # At least two rounds per worker slot, so every level has a steady state to average.
        return max(self.requests_per_level, 2 * concurrency)


class LoadGeneratorError(KvprofError):
    """aiperf failed on a run; the hint points at its log."""


def find_aiperf(repo_root: Path) -> Path:
    """aiperf from its own venv (.venv-aiperf; inside the vLLM venv it downgrades packages)."""
    exe = repo_root / ".venv-aiperf" / "bin" / "aiperf"
    if not exe.exists():
        raise ResourceAbsentError(
            f"aiperf is not installed at {exe}",
            hint="Run `make .venv-aiperf/.installed` (or `make demo`, which installs it).",
        )
    return exe


def aiperf_argv(
    aiperf: Path, url: str, model: str, tokenizer_dir: Path, concurrency: int,
    plan: LoadPlan, artifact_dir: Path,
) -> list[str]:
    """The seed's aiperf call (streaming completions, server token counts), sized for a CPU."""
    return [
        str(aiperf), "profile",
        "--model", model,
        "--url", url,
        "--endpoint-type", "completions",
        "--streaming",
        "--concurrency", str(concurrency),
        "--request-count", str(plan.requests_at(concurrency)),
        "--synthetic-input-tokens-mean", str(plan.input_tokens),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(plan.output_tokens),
        "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--tokenizer", str(tokenizer_dir.resolve()),
        "--use-server-token-count",
        "--random-seed", str(plan.seed),
        "--warmup-request-count", str(plan.warmup),
        "--ui", "none",
        # aiperf scrapes the frontend's /metrics every ~0.4 s into a summary nothing here
        # reads: measured 11 CPU-s per run on 2 cores, and each scrape wakes the frontend.
        "--no-server-metrics",
        "--output-artifact-dir", str(artifact_dir),
    ]


def aiperf_env() -> dict[str, str | None]:
    """HF_HUB_OFFLINE makes aiperf call snapshot_download even for a local tokenizer folder and
    fail, so the hub endpoint points at a closed local port instead (vllm-on-cpu.md)."""
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None,
            "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1"}


def run_aiperf(
    pm: ProcessManager, aiperf: Path, url: str, model: str, tokenizer_dir: Path,
    concurrency: int, plan: LoadPlan, artifact_dir: Path, timeout_s: float = 600.0,
) -> dict:
    """Run one aiperf profile and return its summary JSON (profile_export_aiperf.json).

    aiperf starts several service processes; running it through the ProcessManager means a
    Ctrl-C or a failure elsewhere stops all of them, not just the launcher.
    """
    artifact_dir.mkdir(parents=True, exist_ok=True)
    log_path = artifact_dir / "aiperf-console.log"
    argv = aiperf_argv(aiperf, url, model, tokenizer_dir, concurrency, plan, artifact_dir)
    proc = pm.start(f"aiperf-c{concurrency}", argv, env=aiperf_env(), log_path=log_path)
    rc = pm.wait_exit(proc, timeout_s)
    pm.stop(proc, grace_s=5)
    if rc is None:
        raise LoadGeneratorError(
            f"aiperf at concurrency {concurrency} ran past {timeout_s:.0f} s",
            hint=f"See {log_path}; lower --requests or the concurrency levels.",
        )
    summary_path = artifact_dir / AIPERF_SUMMARY
    if rc != 0 or not summary_path.exists():
        raise LoadGeneratorError(
            f"aiperf at concurrency {concurrency} against {url} failed (exit {rc})\n"
            + log_tail(log_path, 10),
            hint=f"See {log_path} and {artifact_dir}/logs/aiperf.log.",
        )
    summary = json.loads(summary_path.read_text())
    log.info("aiperf c=%d -> %s", concurrency, summary_path)
    return summary


def failed_requests(summary: dict) -> int:
    """Requests aiperf counted as errors in one run (its error_summary; 0 when it has none)."""
    total = 0
    for entry in summary.get("error_summary") or ():
        count = entry.get("count") if isinstance(entry, dict) else None
        total += int(count) if isinstance(count, int | float) else 1
    return total


def headline(summary: dict) -> str:
    """One line per run: requests, TTFT avg/p99 and output tokens/s, read from aiperf's JSON."""
    def stat(key: str, field: str) -> float | None:
        # aiperf schema 1.4 names; older releases wrote `ttft` (shared/fixtures/SOURCES.md).
        entry = summary.get(key) or summary.get({"time_to_first_token": "ttft"}.get(key, ""), {})
        value = entry.get(field) if isinstance(entry, dict) else None
        return float(value) if isinstance(value, int | float) else None

    count = stat("request_count", "avg")
    ttft = stat("time_to_first_token", "avg")
    ttft99 = stat("time_to_first_token", "p99")
    tput = stat("output_token_throughput", "avg")
    parts = [
        f"{int(count)} requests" if count is not None else "requests: no data",
        f"TTFT avg {ttft:.0f} ms" if ttft is not None else "TTFT: no data",
        f"p99 {ttft99:.0f} ms" if ttft99 is not None else "",
        f"{tput:.0f} output tok/s" if tput is not None else "",
    ]
    return ", ".join(p for p in parts if p)
