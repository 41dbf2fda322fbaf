"""Why each leg was long: causes with their evidence, per request and ranked.

A leg says *where* time went; a cause says *why*, and is named only where a measurement
supports it, else the leg is reported as is:

- ``wire`` / ``post`` / ``notice``: the KV transfer split by NIXL's own per-transfer
  telemetry (kv.transfer.post / .wire / .notice spans): the bytes on the wire as NIXL
  measured them, handing the read to NIXL, and the decode worker reporting a transfer NIXL
  had already seen done.
- ``handshake``: the NIXL handshake on first contact (kv.handshake).
- ``prefill_step`` / ``decode_step``: the engine step that computed the first token, with
  what it carried (vllm.engine.step records, kvprof.analysis.loaders.steps).
- ``co_tenants``: a waiting leg (EngineCore intake, waiting for a step boundary, KV ready ->
  scheduled, scheduler queue) spent behind steps that carried other requests: "waited 38 ms
  behind a step that prefilled 512 tokens of request 5f2c... and decoded 3 others".
- ``step_boundary``: the same wait behind steps that carried only this request.
- ``queueing``: a scheduler-queue leg while other requests waited before it.
- ``cpu``: the leg's process waited for a core inside the leg (kvprof.analysis.cpu_wait,
  helper 19b's attribution); taken out of the leg's other cause so nothing counts twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvprof.analysis import legs as lg

if TYPE_CHECKING:
    import pandas as pd

LABELS = {
    "wire": "KV on the wire (NIXL's own measurement, less the poll wait below)",
    "poll_wait": "KV read done at some point, seen only at the decode worker's next poll "
                 "(NIXL completes a read when polled, once per engine step)",
    "post": "handing the KV read to NIXL (load started -> NIXL started it)",
    "notice": "transfer completion noticed late (NIXL done -> the decode worker reported it)",
    "handshake": "first-contact NIXL handshake",
    "prefill_step": "the prefill engine's step that computed the first token",
    "decode_step": "the decode engine's first step",
    "co_tenants": "batch co-tenants (steps carrying other requests held this one)",
    "step_boundary": "waiting for the engine's own step boundary",
    "queueing": "scheduler queueing (other requests waiting ahead)",
    "cpu": "CPU contention (a process waited for a core)",
}
_COMPUTE = {"prefill.first_token": "prefill_step", "engine.first_token": "prefill_step",
            "decode.first_token": "decode_step"}
_WAITING = {"prefill.core.arrive", "decode.core.arrive", "engine.core.arrive", "kv.load.start",
            "kv.ready", "decode.scheduled", "prefill.scheduled", "engine.scheduled"}
_QUEUE = {"decode.scheduled", "prefill.scheduled", "engine.scheduled"}
_SIDE_ROLE = {"prefill": "prefill", "decode": "decode", "engine": "aggregated"}
MIN_MS = 0.05  # below this a cause is noise, not named


def _short(rid: str) -> str:
    return rid[:8] + "..." if len(rid) > 11 else rid


def _carried(steps: pd.DataFrame, own: str | None) -> str:
    """What steps carried, in words (the first step's batch when they are several)."""
    parts = []
    for row in steps.head(2).itertuples(index=False):
        others = [r for r in row.request_ids if r != own]
        what = []
        if row.prefill_tokens > 0:
            what.append(f"prefilled {int(row.prefill_tokens)} tokens"
                        + (f" of request {_short(others[0])}" if others else ""))
        if row.decode_seqs > 0:
            mine = own in row.request_ids
            n = int(row.decode_seqs) - (1 if mine and row.prefill_tokens <= 0 else 0)
            if n > 0:
                what.append(f"decoded {n} other{'s' if n != 1 else ''}")
        parts.append(f"step {int(row.step)} ({row.duration_ms:.1f} ms, "
                     + (" and ".join(what) or "carried nothing else") + ")")
    more = len(steps) - 2
    return "; ".join(parts) + (f"; and {more} more step(s)" if more > 0 else "")


def _engine_ids(spans: pd.DataFrame, all_keys: pd.Series) -> dict[tuple[str, str], str]:
    """(request key, role) -> the engine's own vLLM request id."""
    if "request_id" not in spans or not len(spans):
        return {}
    sub = spans[spans["request_id"].notna() & spans["role"].notna()
                & (spans["name"].astype(str) != "vllm.engine.step")]
    if not len(sub):
        return {}
    keys = all_keys.loc[sub.index]
    out: dict[tuple[str, str], str] = {}
    for k, role, rid in zip(keys, sub["role"].astype(str), sub["request_id"].astype(str),
                            strict=True):
        out.setdefault((str(k), role), rid)
    return out


def _poll_gaps(spans: pd.DataFrame, all_keys: pd.Series) -> dict[str, float]:
    """Request key -> nixl.poll_gap_ms of its kv.transfer.wire span."""
    from kvprof import semconv as sc

    if "nixl_poll_gap_ms" not in spans or not len(spans):
        return {}
    wire = spans[(spans["name"].astype(str) == sc.SPAN_KV_WIRE)
                 & spans["nixl_poll_gap_ms"].notna()]
    if not len(wire):
        return {}
    keys = all_keys.loc[wire.index]
    return {str(k): float(v) for k, v in zip(keys, wire["nixl_poll_gap_ms"], strict=True)}


def request_causes(bd: Any, spans: pd.DataFrame, steps: pd.DataFrame | None,
                   cpu: pd.DataFrame | None) -> dict[str, list[dict]]:
    """Per request key: its causes [{cause, ms, leg, stage, evidence}], legs' order."""
    from kvprof.analysis.cpu_wait import cause_text, leg_windows

    windows = leg_windows(getattr(bd, "milestones", {}) or {}, bd.requests)
    if not len(windows):
        return {}
    req = bd.requests.set_index("key")
    from kvprof.analysis.breakdown import span_request_keys

    all_keys = (span_request_keys(spans) if len(spans) else None)
    ids = _engine_ids(spans, all_keys) if steps is not None and len(steps) else {}
    cpu_by = {}
    if cpu is not None and len(cpu):
        for row in cpu.itertuples(index=False):
            if row.wait_ms >= 1.0:
                cpu_by[(str(row.key), str(row.leg))] = (
                    float(row.wait_ms), cause_text(str(row.process), int(row.pid),
                                                   float(row.wait_ms), str(row.thread or "")))
    by_role = {}
    if steps is not None and len(steps):
        for role, grp in steps.groupby("role"):
            by_role[str(role)] = grp
    gaps = _poll_gaps(spans, all_keys) if all_keys is not None else {}
    stage_of = {(name, m.id): m.stage for name, chain in lg.CHAINS.items() for m in chain}
    out: dict[str, list[dict]] = {}
    for w in windows.itertuples(index=False):
        key, mid = str(w.key), str(w.leg)[4:]
        leg_ms = float(w.leg_ms)
        stage = stage_of.get((w.chain, mid), "")
        found: list[dict] = []
        left = leg_ms
        c = cpu_by.get((key, str(w.leg)))
        if c is not None:
            ms = min(c[0], leg_ms)
            found.append({"cause": "cpu", "ms": ms, "evidence": c[1]})
            left -= ms
        r = req.loc[key] if key in req.index else None
        split = r is not None and _num(r.get("leg:kv.wire.end")) is not None
        if mid == "kv.wire.end":
            ev = "NIXL's getXferTelemetry for this transfer"
            if r is not None and _num(r.get("kv_bytes")) and leg_ms > 0:
                ev += (f": {int(r['kv_bytes'])} bytes in {leg_ms:.2f} ms = "
                       f"{r['kv_bytes'] / leg_ms / 1e6:.3g} GB/s")
            gap = min(gaps.get(key, 0.0), left)
            if gap > MIN_MS:
                # NIXL learns of a completion when the worker polls (once per step): the
                # read was still in flight at a poll this long before the one that saw it
                # done; when in between it finished is not measured.
                found.append({"cause": "poll_wait", "ms": gap, "evidence":
                              f"the read was last seen in flight (at a decode worker poll, or "
                              f"its start) {gap:.2f} ms before the poll that saw it done"})
                left -= gap
                ev += f"; at least this long on the wire, at most {left + gap:.2f} ms"
            found.append({"cause": "wire", "ms": left, "evidence": ev})
        elif mid == "kv.posted":
            found.append({"cause": "post", "ms": left,
                          "evidence": "load started -> NIXL's transfer start (its telemetry)"})
        elif mid == "kv.transfer.end" and split:
            found.append({"cause": "notice", "ms": left, "evidence":
                          "NIXL saw the read done this long before the decode worker's "
                          "connector reported it finished"})
        elif mid == "kv.handshake.end":
            found.append({"cause": "handshake", "ms": left,
                          "evidence": "kv.handshake span (first contact with this prefill "
                                      "engine)"})
        elif (mid in _COMPUTE or mid in _WAITING) and by_role:
            side = mid.split(".", 1)[0] if mid.split(".", 1)[0] in _SIDE_ROLE else "decode"
            role = _SIDE_ROLE[side]
            grp = by_role.get(role)
            if grp is not None and len(grp["engine"].unique()) == 1 and left > MIN_MS:
                own = ids.get((key, role))
                held = grp[(grp["end_ns"] > w.start_ns) & (grp["start_ns"] < w.end_ns)]
                if mid in _COMPUTE:
                    if len(held):
                        found.append({"cause": _COMPUTE[mid], "ms": left, "evidence":
                                      "computed in " + _carried(held, own)})
                elif len(held):
                    others = held[[any(x != own for x in ids_) for ids_ in held["request_ids"]]]
                    if len(others):
                        ms = float(sum(min(e, w.end_ns) - max(s, w.start_ns) for s, e in zip(
                            others["start_ns"], others["end_ns"], strict=True)) / 1e6)
                        ms = min(ms, left)
                        found.append({"cause": "co_tenants", "ms": ms, "evidence":
                                      f"waited {ms:.1f} ms behind " + _carried(others, own)})
                        left -= ms
                    if left > MIN_MS and mid in _QUEUE and (held["waiting"] > 1).any():
                        found.append({"cause": "queueing", "ms": left, "evidence":
                                      f"{int(held['waiting'].max())} requests waiting"})
                    elif left > MIN_MS and len(held) > len(others):
                        found.append({"cause": "step_boundary", "ms": left, "evidence":
                                      "waited for " + _carried(held, own)})
        for f in found:
            if f["ms"] > MIN_MS:
                out.setdefault(key, []).append({**f, "leg": mid, "stage": stage,
                                                "ms": round(float(f["ms"]), 3)})
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def rank(done: pd.DataFrame, per_request: dict[str, list[dict]]) -> list[dict]:
    """Causes by mean ms per request over ``done``, each with its evidence and share."""
    import pandas as pd

    if not len(done):
        return []
    ttft = float(done["ttft_ms"].mean())
    rows = [{"key": k, **c} for k in done["key"].astype(str) for c in per_request.get(k, [])]
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    out = []
    n = len(done)
    for cause, grp in frame.groupby("cause"):
        per_req = grp.groupby("key")["ms"].sum()
        mean = float(per_req.sum() / n)
        top = grp.sort_values("ms", ascending=False).iloc[0]
        out.append({
            "cause": str(cause), "label": LABELS.get(str(cause), str(cause)), "mean_ms": mean,
            "share": mean / ttft if ttft > 0 else 0.0, "requests": int(per_req.size),
            "headline": f"{LABELS.get(str(cause), str(cause))}: {mean:.1f} ms per request "
                        f"({100 * mean / ttft:.0f}% of TTFT)" if ttft > 0 else "",
            "evidence": [f"largest in request {top['key']}: {top['ms']:.1f} ms "
                         f"({top['evidence']})"],
        })
    return sorted(out, key=lambda c: c["mean_ms"], reverse=True)


def poll_gaps(spans: pd.DataFrame) -> dict[str, float]:
    """Request key -> nixl.poll_gap_ms of its transfer (where NIXL's telemetry had one)."""
    from kvprof.analysis.breakdown import span_request_keys

    if "nixl_poll_gap_ms" not in spans or not spans["nixl_poll_gap_ms"].notna().any():
        return {}
    return _poll_gaps(spans, span_request_keys(spans))


def transfer_split(req: pd.DataFrame, gaps: dict[str, float] | None = None
                   ) -> dict[str, Any] | None:
    """summary.transfer_split: post / wire / notice {mean, p50, p99} over measured transfers,
    and the wire's poll gap (how much of NIXL's figure may be the wait for the poll)."""
    if "leg:kv.wire.end" not in req or "kv.transfer" not in req:
        return None
    has = req["kv.transfer"].notna()
    measured = req[has & req["leg:kv.wire.end"].notna()]
    out: dict[str, Any] = {"transfers": int(has.sum()), "measured": int(len(measured))}
    for name, col in (("post_ms", "leg:kv.posted"), ("wire_ms", "leg:kv.wire.end"),
                      ("notice_ms", "leg:kv.transfer.end")):
        v = measured[col].fillna(0.0) if col in measured else None
        out[name] = ({"mean": float(v.mean()), "p50": float(v.quantile(0.5)),
                      "p99": float(v.quantile(0.99))} if v is not None and len(v) else None)
    if len(measured):
        g = measured["key"].astype(str).map(gaps or {}).fillna(0.0).clip(upper=measured[
            "leg:kv.wire.end"])
        out["wire_poll_gap_ms"] = {"mean": float(g.mean()), "p50": float(g.quantile(0.5)),
                                   "p99": float(g.quantile(0.99))}
        w, total = out["wire_ms"]["mean"], float(measured["kv.transfer"].mean())
        sure = w - float(g.mean())
        out["sentence"] = (f"The wire took {w:.1f} of the {total:.1f} ms the KV transfer "
                           f"lasted on average (NIXL's own measurement); the other "
                           f"{total - w:.1f} ms was the hand-off machinery (handing the read "
                           "to NIXL, the decode worker reporting it done)"
                           + (f", and of the wire's {w:.1f} ms only {sure:.1f} ms were surely "
                              "bytes in flight: NIXL saw completions only at the decode "
                              "worker's next poll, up to "
                              f"{float(g.mean()):.1f} ms later" if g.mean() > MIN_MS else ""))
    else:
        out["sentence"] = ("The wire time is not measured: NIXL gave no per-transfer "
                           "telemetry for these transfers")
    return out


def request_split(row: pd.Series) -> dict[str, float | None] | None:
    """A request row's transfer_split, None without a transfer."""
    if _num(row.get("kv.transfer")) is None:
        return None
    wire = _num(row.get("leg:kv.wire.end"))
    if wire is None:
        return {"post_ms": None, "wire_ms": None, "notice_ms": None, "wire_gbps": None}
    nbytes = _num(row.get("kv_bytes"))
    return {"post_ms": _num(row.get("leg:kv.posted")) or 0.0, "wire_ms": wire,
            "notice_ms": _num(row.get("leg:kv.transfer.end")) or 0.0,
            "wire_gbps": nbytes / wire / 1e6 if nbytes and wire > 0 else None}
