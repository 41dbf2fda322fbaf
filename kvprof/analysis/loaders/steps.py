"""EngineCore steps as a table: one row per ``vllm.engine.step`` span, with its batch.

``load_steps(spans)`` takes the span table (kvprof.analysis.loaders.traces.load_spans) and
returns one row per step, sorted by engine then start:

=====================  =======  =========================================================
column                 dtype    meaning
=====================  =======  =========================================================
engine                 str      service@host/pid: one EngineCore process
service, role          str      resource service.name, kvprof.role
pid                    int64    resource process.pid (-1 unknown)
step                   int64    vllm.step.index (per process, from 0)
start_ns, end_ns       int64    schedule() called, update_from_output() returned (that
                                host's clock, epoch ns)
schedule_end_ns        int64    schedule() returned
execute_end_ns         int64    update_from_output() called (the model runner's step done)
duration_ms, schedule_ms, execute_ms, output_ms
                       float64  the step and its three parts
prefill_tokens         int64    tokens scheduled for requests with more than one token
decode_seqs            int64    requests with exactly one token scheduled
num_reqs, tokens       int64    requests in the batch, tokens scheduled
preempted              int64    requests preempted by this schedule()
waiting, running       int64    scheduler queue lengths when schedule() returned
kv_blocks_free, kv_blocks_total
                       int64    KV cache blocks free / in the pool then
kv_loads_started       int64    KV loads the connector was asked to start this step
kv_loads_finished      int64    KV loads the scheduler saw finished this step
kv_usage               float64  1 - free / total (NaN unknown)
request_ids            object   list[str]: the engine's vLLM request ids in the batch
=====================  =======  =========================================================

Integer columns hold -1 where the engine did not say (an older scheduler, a connector
without loads). Idle steps (nothing scheduled, no KV load started or finished: a decode
engine spins through thousands while it waits for KV) are not recorded; ``step`` counts
them, so a gap in it is that many idle steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvprof import semconv as sc

if TYPE_CHECKING:
    import pandas as pd

INT_COLUMNS = ("pid", "step", "start_ns", "end_ns", "schedule_end_ns", "execute_end_ns",
               "prefill_tokens", "decode_seqs", "num_reqs", "tokens", "preempted", "waiting",
               "running", "kv_blocks_free", "kv_blocks_total", "kv_loads_started",
               "kv_loads_finished")
COLUMNS = ("engine", "service", "role", "pid", "step", "start_ns", "end_ns",
           "schedule_end_ns", "execute_end_ns", "duration_ms", "schedule_ms", "execute_ms",
           "output_ms", "prefill_tokens", "decode_seqs", "num_reqs", "tokens", "preempted",
           "waiting", "running", "kv_blocks_free", "kv_blocks_total", "kv_loads_started",
           "kv_loads_finished", "kv_usage", "request_ids")
_FROM_ATTR = ("prefill_tokens", "decode_seqs", "num_reqs", "tokens", "preempted", "waiting",
              "running", "kv_blocks_free", "kv_blocks_total", "kv_loads_started",
              "kv_loads_finished")


def empty_steps() -> pd.DataFrame:
    """A step table with no rows (and every column)."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="int64" if c in INT_COLUMNS else object
                                      if c in ("engine", "service", "role", "request_ids")
                                      else "float64") for c in COLUMNS})


def load_steps(spans: pd.DataFrame) -> pd.DataFrame:
    """One row per EngineCore step (schema above) from a span table."""
    import numpy as np
    import pandas as pd

    if spans is None or "name" not in spans or not len(spans):
        return empty_steps()
    s = spans[spans["name"].astype(str) == sc.SPAN_ENGINE_STEP]
    if not len(s):
        return empty_steps()

    def col(name: str, default=np.nan) -> pd.Series:
        if name in s:
            return pd.to_numeric(s[name], errors="coerce")
        return pd.Series(default, index=s.index, dtype=float)

    out = pd.DataFrame(index=s.index)
    service = s["service"].astype(str) if "service" in s else pd.Series("?", index=s.index)
    host = s["host"].astype(str) if "host" in s else pd.Series("?", index=s.index)
    pid = col("pid").fillna(-1).astype("int64")
    out["engine"] = service + "@" + host + "/" + pid.astype(str)
    out["service"] = service
    out["role"] = s["role"].astype(str) if "role" in s else None
    out["pid"] = pid
    out["step"] = col("step_index").fillna(-1).astype("int64")
    out["start_ns"] = s["start_ns"].astype("int64")
    out["end_ns"] = s["end_ns"].astype("int64")
    sched = col("step_schedule_ms")
    execute = col("step_execute_ms")
    output = col("step_output_ms")
    out["schedule_end_ns"] = (out["start_ns"] + (sched.fillna(0) * 1e6).round()).astype("int64")
    out["execute_end_ns"] = (out["end_ns"] - (output.fillna(0) * 1e6).round()).astype("int64")
    out["duration_ms"] = (out["end_ns"] - out["start_ns"]) / 1e6
    out["schedule_ms"], out["execute_ms"], out["output_ms"] = sched, execute, output
    for c in _FROM_ATTR:
        out[c] = col("step_" + c).fillna(-1).astype("int64")
    total = out["kv_blocks_total"].where(out["kv_blocks_total"] > 0)
    out["kv_usage"] = 1.0 - out["kv_blocks_free"].where(out["kv_blocks_free"] >= 0) / total
    ids = s["step_request_ids"] if "step_request_ids" in s else pd.Series("", index=s.index)
    out["request_ids"] = [str(v).split(",") if isinstance(v, str) and v else []
                          for v in ids.to_numpy(dtype=object)]
    return out.sort_values(["engine", "start_ns"], kind="stable").reset_index(drop=True)[
        list(COLUMNS)]


def steps_overlapping(steps: pd.DataFrame, engine: str, t0_ns: float,
                      t1_ns: float) -> pd.DataFrame:
    """The steps of ``engine`` that overlap [t0_ns, t1_ns] (that host's clock)."""
    sel = steps[(steps["engine"] == engine) & (steps["end_ns"] > t0_ns)
                & (steps["start_ns"] < t1_ns)]
    return sel
