"""Parse vLLM's NIXL log lines (transfer metrics, KV lease expiries) and vllm:nixl_* samples."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.errors import BadInputError

log = logging.getLogger(__name__)
# No transfer time, size, rate or count of a real run comes near this.
_MAX_VALUE = 1e15

if TYPE_CHECKING:
    import pandas as pd

_LINE = re.compile(r"KV Transfer metrics:\s*(?P<body>.*)$")
_FIELD = re.compile(r"\s*(?P<key>[^=,]+?)\s*=\s*(?P<value>[^,\s]+)")
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
    from kvprof.inputs import check_input

    check_input(p, "vLLM log", hint="Pass a vLLM worker's log file (saved stdout/stderr).")
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
    bad: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _LINE.search(line)
        if not match:
            continue
        row: dict = {"line": lineno}
        for field in _FIELD.finditer(match.group("body")):
            col = _FIELDS.get(field.group("key").strip())
            if col:
                value = _plausible(field.group("value"))
                if value is None:
                    bad.append(f"line {lineno}: {field.group('key').strip()}="
                               f"{field.group('value')}")
                else:
                    row[col] = value
        rows.append(row)
    if bad:
        log.warning("%s: left out %d value(s) that are not numbers in range: %s", p, len(bad),
                    "; ".join(bad[:3]))
    if not rows and required:
        raise BadInputError(f"{p} holds no \"KV Transfer metrics\" lines",
                            hint="Pass a log of a vLLM decode worker using the NIXL connector.")
    return pd.DataFrame(rows, columns=["line", *_FIELDS.values()])


def parse_nixl_prometheus(path: str | Path) -> pd.DataFrame:
    """vllm:nixl_* samples of a Prometheus text exposition (a saved /metrics page)."""
    import pandas as pd
    from prometheus_client.parser import text_string_to_metric_families

    from kvprof.inputs import check_input

    p = check_input(path, "metrics file",
                    hint="Save a worker's /metrics: curl -s HOST:PORT/metrics")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BadInputError(f"cannot read metrics file {p}: {exc.strerror}") from None
    rows = []
    bad: list[str] = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(("vllm:nixl_", "vllm_nixl_")):
                    if _plausible(s.value) is None:
                        bad.append(f"{s.name}={s.value}")
                        continue
                    rows.append({"name": s.name, "labels": dict(s.labels), "value": s.value})
    except ValueError as exc:
        raise BadInputError(f"{p} is not Prometheus text format ({exc})",
                            hint="Save a worker's /metrics: curl -s HOST:PORT/metrics") from None
    if bad:
        log.warning("%s: left out %d sample(s) that are NaN, infinite, negative or absurd: %s",
                    p, len(bad), "; ".join(bad[:3]))
    if not rows:
        raise BadInputError(f"{p} holds no vllm:nixl_* samples"
                            + (f" in range ({'; '.join(bad[:3])})" if bad else ""),
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


def _plausible(text: str | float) -> float | None:
    """A finite, non-negative, not absurd number, or None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 <= value <= _MAX_VALUE else None
