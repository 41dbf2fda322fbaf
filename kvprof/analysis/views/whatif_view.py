"""The report's what-if section (report.json ``whatif``): measured rows beside predicted ones."""

from __future__ import annotations

from typing import Any

TITLE = "What-if model: calibrated on the lower levels, predicting the highest"


def _ms(v: float | None) -> str | None:
    return None if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v:+.0f}%"


def whatif_table(data: dict[str, Any]) -> tuple[list[str], list[list]] | None:
    """(header, rows), every predicted row labelled so; None when the report has no what-if."""
    w = data.get("whatif") or {}
    if not w.get("levels"):
        return None
    header = ["concurrency", "source", "requests", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms",
              "error on mean", "error on p99"]
    rows = [[r["concurrency"], "predicted (model)" if r["source"] == "predicted" else "measured",
             r["requests"], _ms(r["ttft_mean_ms"]), _ms(r["ttft_p50_ms"]), _ms(r["ttft_p99_ms"]),
             _pct(r.get("error_mean_pct")) or "", _pct(r.get("error_p99_pct")) or ""]
            for r in w["levels"]]
    return header, rows


# The model's legs (kvprof.analysis.whatif.simulate) in the report's words: coarser than the
# breakdown's (queue and compute per engine role, the stages between them as one leg each).
_MODEL_LEGS = {"in": "client -> first engine (frontend, router, API server)",
               "mid": "prefill -> decode hand-off (besides the KV transfer)",
               "out": "decode -> client (first token out)",
               "kv.transfer": "KV transfer", "kv.handshake": "NIXL handshake",
               "kv.link_wait": "KV waiting for the link", "kv.wire": "KV on the wire",
               "kv.fixed": "KV transfer's fixed cost"}
_MODEL_PARTS = {"queue": "scheduler queue", "compute": "compute"}


def model_leg_words(leg: str) -> str:
    """A what-if model leg ('decode.queue', 'kv.wire', 'in') in words."""
    if leg in _MODEL_LEGS:
        return _MODEL_LEGS[leg]
    role, _, part = leg.partition(".")
    if part in _MODEL_PARTS:
        return f"{role} engine's {_MODEL_PARTS[part]}"
    return leg


def whatif_text(data: dict[str, Any]) -> list[str]:
    """The validation sentence and where the calibration is thin."""
    w = data.get("whatif") or {}
    if w.get("error"):
        return [f"The what-if model could not run: {w['error']}"]
    out = []
    if w.get("predicted_level") is not None and w.get("error_pct") is not None:
        out.append(
            f"Calibrated on concurrency {', '.join(map(str, w['calibrated_on']))} and asked to "
            f"predict {w['predicted_level']}: predicted mean TTFT "
            f"{_ms(w['predicted_ttft_mean_ms'])} ms against "
            f"{_ms(w['measured_ttft_mean_ms'])} ms measured ({_pct(w['error_pct'])}), "
            f"p99 {_ms(w['predicted_ttft_p99_ms'])} ms against "
            f"{_ms(w['measured_ttft_p99_ms'])} ms ({_pct(w['error_p99_pct'])}). Predicted figures "
            "are the model's, not measurements; `kvprof whatif` asks it about other deployments.")
    if w.get("predicted_legs_ms") and w.get("measured_legs_ms"):
        from kvprof.analysis.whatif.compare import leg_table

        gaps = sorted((d, k) for k, _, _, d in leg_table(w["predicted_legs_ms"],
                                                         w["measured_legs_ms"])
                      if d is not None)
        big = sorted(gaps, key=lambda x: -abs(x[0]))[:3]
        out.append(f"Per leg at {w['predicted_level']} (predicted - measured, mean ms per "
                   "request): " + ", ".join(f"{model_leg_words(k)} {d:+,.0f}"
                                            for d, k in big)
                   + " (`kvprof whatif` prints every leg).")
    cal = w.get("calibration") or {}
    out += [f"Calibration thin: {t}" for t in cal.get("thin", [])]
    out += list(w.get("notes", []))
    return out
