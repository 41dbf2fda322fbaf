"""Parse vLLM's NIXL log lines (transfer metrics, KV lease expiries) and vllm:nixl_* samples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

_LINE = re.compile(r"KV Transfer metrics:\s*(?P<body>.*)$")
_FIELD = re.compile(r"\s*(?P<key>[^=,]+?)\s*=\s*(?P<value>[-+0-9.eE]+)")
# vLLM's labels -> column names (units in the column names).
_FIELDS = {
    "Num successful transfers": "transfers",
    "Avg xfer time (ms)": "avg_xfer_ms",
    "P90 xfer time (ms)": "p90_xfer_ms",
    "Avg post time (ms)": "avg_post_ms",
    "P90 post time (ms)": "p90_post_ms",
    "Avg MB per transfer": "avg_mb",
    "Throughput (MB/s)": "throughput_mb_s",
    "Avg number of descriptors": "avg_descriptors",
}


# The prefill side's NIXL worker frees a request's KV blocks when its send lease
# (kv_lease_duration, 30 s by default) runs out before every decode worker pulled them: that
# request's decode side waited or recomputed, whatever its transfer span says.
_LEASE_EXPIRY = re.compile(
    r"Releasing expired KV blocks for request (?P<request_id>\S+) which were retrieved by "
    r"(?P<retrieved_by>\d+) remote worker"
)


def _read_log(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BadInputError(f"cannot read vLLM log {p}: {exc.strerror}") from None


def parse_lease_expiries(path: str | Path) -> pd.DataFrame:
    """One row per NIXL KV-lease expiry line of a (prefill) vLLM log; empty if there are none."""
    import pandas as pd

    p = Path(path)
    rows = [
        {"line": lineno, "request_id": m.group("request_id"),
         "retrieved_by": int(m.group("retrieved_by"))}
        for lineno, line in enumerate(_read_log(p).splitlines(), start=1)
        if (m := _LEASE_EXPIRY.search(line))
    ]
    return pd.DataFrame(rows, columns=["line", "request_id", "retrieved_by"])


def parse_kv_transfer_log(path: str | Path, required: bool = True) -> pd.DataFrame:
    """One row per "KV Transfer metrics" line of a vLLM log (other lines ignored).

    With ``required`` a log without such lines is bad input; without it, an empty frame.
    """
    import pandas as pd

    p = Path(path)
    text = _read_log(p)
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _LINE.search(line)
        if not match:
            continue
        row: dict = {"line": lineno}
        for field in _FIELD.finditer(match.group("body")):
            col = _FIELDS.get(field.group("key").strip())
            if col:
                row[col] = float(field.group("value"))
        rows.append(row)
    if not rows and required:
        raise BadInputError(f"{p} holds no \"KV Transfer metrics\" lines",
                            hint="Pass a log of a vLLM decode worker using the NIXL connector.")
    return pd.DataFrame(rows, columns=["line", *_FIELDS.values()])


def parse_nixl_prometheus(path: str | Path) -> pd.DataFrame:
    """vllm:nixl_* samples of a Prometheus text exposition (a saved /metrics page)."""
    import pandas as pd
    from prometheus_client.parser import text_string_to_metric_families

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BadInputError(f"cannot read metrics file {p}: {exc.strerror}") from None
    rows = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(("vllm:nixl_", "vllm_nixl_")):
                    rows.append({"name": s.name, "labels": dict(s.labels), "value": s.value})
    except ValueError as exc:
        raise BadInputError(f"{p} is not Prometheus text format ({exc})",
                            hint="Save a worker's /metrics: curl -s HOST:PORT/metrics") from None
    if not rows:
        raise BadInputError(f"{p} holds no vllm:nixl_* samples",
                            hint="NIXL metrics appear on decode workers using NixlConnector.")
    return pd.DataFrame(rows, columns=["name", "labels", "value"])


def nixl_summary(samples: pd.DataFrame) -> dict[str, float]:
    """Mean per histogram/summary (sum / count) and totals of counters, by metric name."""
    out: dict[str, float] = {}
    sums = samples[samples["name"].str.endswith("_sum")].groupby("name")["value"].sum()
    counts = samples[samples["name"].str.endswith("_count")].groupby("name")["value"].sum()
    for name, total in sums.items():
        base = name[: -len("_sum")]
        count = counts.get(base + "_count", 0)
        if count:
            out[base + " (mean)"] = float(total / count)
            out[base + " (count)"] = float(count)
    for name, value in samples[samples["name"].str.endswith("_total")].groupby("name")[
            "value"].sum().items():
        out[name] = float(value)
    return out
