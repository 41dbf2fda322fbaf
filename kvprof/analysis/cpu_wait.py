"""CPU contention as evidence: the run-queue wait of a leg's process inside the leg's window.

Each leg of a request (kvprof.analysis.legs) runs between two milestones; the process that
records the leg's end milestone is the one whose work (or lateness) the leg measures: the
load generator for the client's last leg, the router for the router's legs, the prefill or
decode engine's processes for theirs. The schedstat collector sampled, per watched process
and interval, the run-queue wait of the thread that waited most
(kvprof.analysis.loaders.cpu_waits). A leg that overlaps intervals where its process waited
for a core gets that wait, pro rata of the overlap (the wait is taken as spread evenly over
its interval, or over its own length before the interval's end when it is longer), from
the process of its role that waited most in the window: the cause
"CPU contention (process X waited N ms for a core)".

The leg windows are on the report's reference clock and the samples on the collecting
node's wall clock: on one machine (``--one-clock``) they agree; across nodes the clock
offsets the report estimates are not applied to the samples (a limitation: the offsets are
per engine, the samples per node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvprof.analysis import legs as lg

if TYPE_CHECKING:
    import pandas as pd

CAUSE = "CPU contention"
ROLE_CLIENT = "client"
# The collector's role labels of the processes that run each side of a request.
_ROLES = {
    "client": (ROLE_CLIENT,),
    "router": ("router", "frontend"),
    "prefill": ("prefill",),
    "decode": ("decode",),
    "engine": ("aggregated", "auto", "watched"),
}
ATTRIBUTION_COLUMNS = ("key", "leg", "leg_ms", "start_ns", "end_ns", "role", "pid", "process",
                       "thread", "wait_ms")
# A wait below this is noise of the pro-rata split, not a cause.
MIN_WAIT_MS = 1.0


def leg_side(milestone_id: str) -> str | None:
    """Which side's process records the milestone a leg ends at (None: the client's send)."""
    if milestone_id == "client.first":
        return "client"
    if milestone_id == "client.send":
        return None
    head = milestone_id.split(".", 1)[0]
    if head in ("router", "frontend"):
        return "router"
    if head in ("prefill", "decode", "engine"):
        return head
    if milestone_id.startswith("kv.serialize"):
        return "prefill"
    if head == "kv":
        return "decode"
    return None


def _chain_roles(chain_name: str, side: str) -> tuple[str, ...]:
    roles = _ROLES[side]
    if chain_name.startswith("dynamo") and side == "router":
        return ("frontend", "router", "auto")
    return roles


def leg_windows(milestones: dict[str, tuple], requests: pd.DataFrame) -> pd.DataFrame:
    """Per request and named leg: its window [start_ns, end_ns] and the side that runs it."""
    import numpy as np
    import pandas as pd

    parts = []
    for chain_name, (keys, times) in milestones.items():
        chain = lg.CHAINS[chain_name]
        sub = requests.set_index("key").reindex(keys)
        for j, m in enumerate(chain[1:], start=1):
            col = "leg:" + m.id
            if col not in sub:
                continue
            side = leg_side(m.id)
            leg_ms = sub[col].to_numpy(dtype=float)
            end = times[:, j]
            ok = ~np.isnan(leg_ms) & ~np.isnan(end) & (side is not None)
            if not ok.any():
                continue
            parts.append(pd.DataFrame({
                "key": np.asarray(keys)[ok], "leg": col, "leg_ms": leg_ms[ok],
                "start_ns": end[ok] - leg_ms[ok] * 1e6, "end_ns": end[ok],
                "chain": chain_name, "side": side}))
    if not parts:
        return pd.DataFrame(columns=["key", "leg", "leg_ms", "start_ns", "end_ns", "chain",
                                     "side"])
    return pd.concat(parts, ignore_index=True)


def _cumulative(waits: pd.DataFrame):
    """Knots (t, cumulative wait) of one process: each interval's wait spread evenly over
    the interval, or, when it is longer than the interval, over the wait's own length
    before the interval's end.

    Why: the kernel adds a wait to a thread's schedstat only when the thread gets a core
    (sched_info_arrive), so a 250 ms wait shows up whole in the one 20 ms interval where it
    ended; spread over that interval alone, most of it fell after the leg it delayed
    (tests/probes/test_known_delays.py, the CPU-hog place)."""
    import numpy as np

    w = waits.sort_values("time_ns")
    end = w["time_ns"].to_numpy(dtype=float)
    interval = w["interval_ns"].to_numpy(dtype=float)
    per = w["top_thread_wait_ms"].to_numpy(dtype=float)
    # Without the top-thread gauge (an older collector), the summed wait capped at the
    # interval: never more than the wall time that passed.
    fallback = np.minimum(w["runqueue_wait_ms"].to_numpy(dtype=float), interval / 1e6)
    per = np.where(np.isnan(per), fallback, per)
    per = np.maximum(np.nan_to_num(per, nan=0.0), 0.0)
    span = np.maximum(np.maximum(interval, per * 1e6), 1.0)
    # A sum of ramps (they overlap where a long wait reaches back over earlier intervals):
    # piecewise linear, its slope changing by +rate where a ramp starts and -rate where it
    # ends.
    rate = per / span
    x = np.concatenate([end - span, end])
    dslope = np.concatenate([rate, -rate])
    order = np.argsort(x, kind="stable")
    x, dslope = x[order], dslope[order]
    slope = np.cumsum(dslope)
    y = np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(x))])
    return x, np.maximum.accumulate(y), end, w["top_thread"].to_numpy(dtype=object)


def effective_role(role: str, service: str, process: str) -> str:
    """The side a watched process serves: its collector role, or for ``auto`` (kvprof
    attach's default, e.g. NVIDIA Dynamo's processes) and ``watched`` what its service or
    process name says (dynamo-prefill, dynamo-frontend, ...)."""
    if role not in ("auto", "watched", ""):
        return role
    name = f"{service} {process}".lower()
    for word, side in (("prefill", "prefill"), ("decode", "decode"), ("frontend", "frontend"),
                       ("router", "router")):
        if word in name:
            return side
    return role


def side_pids(spans: pd.DataFrame, keys: pd.Series) -> dict[tuple[str, str], set]:
    """Per (request key, side): the processes whose spans the request left on that side, as
    pids (OTel resource process.pid) and ``"service:<service.name>"`` (a process of the
    engine that wrote no span of its own, e.g. its API server, shares the engine's service
    name under kvprof attach); ``keys`` aligned to ``spans``
    (kvprof.analysis.breakdown.span_request_keys)."""
    import numpy as np

    from kvprof.analysis import breakdown as bd

    if spans is None or not len(spans):
        return {}
    names = spans["name"].astype(str)
    side_code = bd._sides(spans, names)
    label = {bd.SIDE_PREFILL: "prefill", bd.SIDE_DECODE: "decode",
             bd.SIDE_AGGREGATED: "engine", bd.SIDE_ROUTER: "router"}
    pid = (spans["pid"].to_numpy(dtype=float) if "pid" in spans
           else np.full(len(spans), np.nan))
    service = (spans["service"].astype(object).to_numpy() if "service" in spans
               else np.full(len(spans), None, dtype=object))
    out: dict[tuple[str, str], set] = {}
    for k, sd, p, sv in zip(keys.astype(str).to_numpy(), side_code, pid, service,
                            strict=True):
        if sd not in label:
            continue
        ids = out.setdefault((k, label[sd]), set())
        if not np.isnan(p):
            ids.add(int(p))
        if isinstance(sv, str) and sv and sv != "nan":
            ids.add("service:" + sv)
    return out


def attribute(windows: pd.DataFrame, waits: pd.DataFrame,
              pids_by_side: dict[tuple[str, str], set] | None = None) -> pd.DataFrame:
    """Per request and leg, the run-queue wait of its side's process inside the leg's window.

    ``windows``: :func:`leg_windows`; ``waits``: kvprof.analysis.loaders.cpu_waits;
    ``pids_by_side``: :func:`side_pids`. A leg's candidate processes are those whose spans
    the request left on the leg's side, by pid or service name (one engine of several),
    where the collector watched them; otherwise every watched process of the side's role.
    Not the process that recorded the leg's end alone: the work of a leg crosses processes
    (an EngineCore span, the worker's compute), and the own process measured ~0 wait while
    the leg grew (19b's report, a continuous hog on the decode core). Known limit: a
    busy-polling thread "waits for a core" whenever anything else runs on its core, and
    vLLM's EngineCore and workers poll their shared-memory queues with sched_yield between
    steps and while a step is in flight. The collector leaves a thread that polled through
    an interval out of the top-thread wait (kvprof.collectors.schedstat), but not one kept
    off its core longer than an interval: on a busy machine a polling EngineCore can lose its
    core to another process for a whole sleep of its worker (EEVDF pushes a yielding thread's
    deadline back), and the side's maximum then overstates the wait (a 250 ms sleep read as
    273 ms of the EngineCore's wait in one stretch, issue 19's known-delay run). One row
    per (key, leg) with a candidate: the process that waited most in the window (pid,
    process, the thread that waited most around the window's middle) and ``wait_ms`` (0 when
    it did not wait). Legs without a watched process: no row (no measurement, no cause).
    """
    import numpy as np
    import pandas as pd

    if windows is None or not len(windows) or waits is None or not len(waits):
        return pd.DataFrame(columns=list(ATTRIBUTION_COLUMNS))
    pids_by_side = pids_by_side or {}
    first = waits.drop_duplicates("pid", keep="last").set_index("pid")
    role_of = {int(p): effective_role(str(r), str(s), str(c)) for p, r, s, c in zip(
        first.index, first["role"], first["process"], first["comm"], strict=True)}
    name_of = first["process"].astype(str).to_dict()
    knots = {int(pid): _cumulative(grp) for pid, grp in waits.groupby("pid")}
    watched = list(knots)
    service_of = (first["service"].astype(str).to_dict() if "service" in first
                  else {p: "" for p in watched})
    idents = [(p, "service:" + service_of.get(p, "")) for p in watched]
    out = []
    for (chain_name, side), grp in windows.groupby(["chain", "side"], sort=False):
        roles = _chain_roles(str(chain_name), str(side))
        by_role = np.array([role_of[p] in roles for p in watched])
        # Per row, which watched pids may have run this leg.
        allowed = np.tile(by_role, (len(grp), 1))
        for i, key in enumerate(grp["key"].astype(str)):
            mine = pids_by_side.get((key, str(side)))
            if mine:
                hit = np.array([p in mine or (sv != "service:" and sv in mine)
                                for p, sv in idents])
                if hit.any():
                    allowed[i] = hit
        keep = allowed.any(axis=1)
        if not keep.any():
            continue
        grp, allowed = grp[keep], allowed[keep]
        a = grp["start_ns"].to_numpy(dtype=float)
        b = grp["end_ns"].to_numpy(dtype=float)
        cols = np.flatnonzero(allowed.any(axis=0))
        per_pid = np.full((len(watched), len(grp)), -np.inf)
        for c in cols:
            x, y = knots[watched[c]][0], knots[watched[c]][1]
            per_pid[c] = np.interp(b, x, y) - np.interp(a, x, y)
        per_pid[~allowed.T] = -np.inf
        best = per_pid.argmax(axis=0)
        wait = per_pid[best, np.arange(len(grp))]
        mid = (a + b) / 2
        threads = []
        for i, k in enumerate(best):
            ends, names = knots[watched[k]][2], knots[watched[k]][3]
            at = min(int(np.searchsorted(ends, mid[i])), len(ends) - 1)
            threads.append(str(names[at] or "") if wait[i] >= MIN_WAIT_MS else "")
        chosen = [watched[k] for k in best]
        out.append(pd.DataFrame({
            "key": grp["key"].to_numpy(), "leg": grp["leg"].to_numpy(),
            "leg_ms": grp["leg_ms"].to_numpy(), "start_ns": a, "end_ns": b,
            "role": [role_of[p] for p in chosen], "pid": chosen,
            "process": [name_of[p] for p in chosen], "thread": threads,
            # Never more than the leg itself lasted.
            "wait_ms": np.minimum(np.maximum(wait, 0.0), grp["leg_ms"].to_numpy())}))
    if not out:
        return pd.DataFrame(columns=list(ATTRIBUTION_COLUMNS))
    return pd.concat(out, ignore_index=True)[list(ATTRIBUTION_COLUMNS)]


def cause_text(process: str, pid: int, wait_ms: float, thread: str = "") -> str:
    """The cause in words, with its evidence."""
    who = f"process {process} (pid {pid}"
    who += f", thread {thread})" if thread else ")"
    return f"{CAUSE} ({who} waited {wait_ms:.1f} ms for a core)"


def summarize(attribution: pd.DataFrame, requests: pd.DataFrame | None = None
              ) -> dict[str, Any]:
    """Per leg: mean wait per request over the requests given (all when None), the process
    that waited most, and the cause in words; per process: total wait inside legs."""
    if attribution is None or not len(attribution):
        return {"legs": [], "processes": []}
    att = attribution
    if requests is not None and "key" in requests:
        att = att[att["key"].isin(set(requests["key"]))]
    if not len(att):
        return {"legs": [], "processes": []}
    n_requests = att["key"].nunique()
    legs = []
    for leg, grp in att.groupby("leg", sort=False):
        per_proc = grp.groupby(["pid", "process"])["wait_ms"].sum().sort_values(ascending=False)
        (pid, process), _ = next(iter(per_proc.items()))
        top = grp[grp["pid"] == pid]
        threads = top.loc[top["wait_ms"] >= MIN_WAIT_MS, "thread"]
        thread = str(threads.mode().iloc[0]) if len(threads) and threads.mode().size else ""
        mean_wait = float(grp["wait_ms"].sum() / n_requests)
        legs.append({
            "leg": str(leg).removeprefix("leg:"), "requests": int(grp["key"].nunique()),
            "mean_leg_ms": float(grp["leg_ms"].mean()), "mean_wait_ms": mean_wait,
            "share_of_leg": (float(grp["wait_ms"].sum() / grp["leg_ms"].sum())
                             if grp["leg_ms"].sum() > 0 else None),
            "role": str(top["role"].iloc[0]), "pid": int(pid), "process": str(process),
            "thread": thread,
            "cause": cause_text(str(process), int(pid), mean_wait, thread)
            if mean_wait >= MIN_WAIT_MS else None,
        })
    legs.sort(key=lambda r: r["mean_wait_ms"], reverse=True)
    procs = (att.groupby(["pid", "process", "role"])["wait_ms"].sum()
             .sort_values(ascending=False))
    processes = [{"pid": int(pid), "process": str(p), "role": str(r),
                  "wait_in_legs_ms": float(v)} for (pid, p, r), v in procs.items()]
    return {"legs": legs, "processes": processes}
