"""Read NVIDIA Dynamo's per-request `request_end` records (schema dynamo.request.trace.v1).

Dynamo 1.6.1's frontend writes one record per request when the response stream ends (with
DYN_REQUEST_TRACE=1), to the sinks named in DYN_REQUEST_TRACE_SINKS: ``stderr`` (one line of
its log; with DYN_LOGGING_JSONL=true the line is JSON), ``jsonl`` / ``jsonl_gz`` (files under
DYN_REQUEST_TRACE_OUTPUT_PATH). This loader takes any of them: a line that is the record, or
a JSON log line that holds it (as an object or as a JSON string in one of its fields), in
plain or gzip files or folders of them. Other lines are ignored; a file with none is an
error (one ``Error:`` line and a ``Hint:``), like the other loaders.

One row per request (the last record of a request id wins), columns:

=================================  =======  ===============================================
request_id                         str      Dynamo's request id
x_request_id                       str      the caller's X-Request-Id (None when absent)
request_received_ms                float64  epoch ms, the frontend received the request
prefill_wait_time_ms               float64  received -> prefill started (frontend's view)
prefill_time_ms                    float64  prefill started -> prefill done
ttft_ms                            float64  received -> first token
total_time_ms                      float64  received -> last token
kv_transfer_estimated_latency_ms   float64  prefill done -> decode's first token: an upper
                                            bound on the KV hand-off (it holds the decode
                                            worker's queue and first step too)
input_tokens, output_tokens        float64
prefill_worker_id, decode_worker_id str
source                             str      file:line the record came from
=================================  =======  ===============================================
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SCHEMA = "dynamo.request.trace.v1"
EVENT = "request_end"
FLOAT_FIELDS = ("request_received_ms", "prefill_wait_time_ms", "prefill_time_ms", "ttft_ms",
                "total_time_ms", "kv_transfer_estimated_latency_ms", "input_tokens",
                "output_tokens")
COLUMNS = ("request_id", "x_request_id", *FLOAT_FIELDS, "prefill_worker_id",
           "decode_worker_id", "source")
HINT = ("Pass the NVIDIA Dynamo frontend's log (DYN_REQUEST_TRACE=1, "
        "DYN_REQUEST_TRACE_SINKS=stderr, DYN_LOGGING_JSONL=true) or the files of its jsonl / "
        "jsonl_gz request-trace "
        "sink (DYN_REQUEST_TRACE_OUTPUT_PATH); they hold one 'request_end' record "
        f"(schema {SCHEMA}) per request.")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and (
            p.suffix in (".jsonl", ".json", ".log", ".txt") or p.name.endswith(".gz")))
    return [path]


def _lines(path: Path):
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                yield from fh
        else:
            with path.open(encoding="utf-8", errors="replace") as fh:
                yield from fh
    except (OSError, EOFError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise BadInputError(f"cannot read Dynamo log {path}: {why}", hint=HINT) from None


def holds_records(path: str | Path, limit: int = 64 << 20) -> bool:
    """Whether a (plain) file mentions the request_end schema at all: a cheap test, before
    parsing, for files found beside spans."""
    p = Path(path)
    try:
        if p.name.endswith(".gz") or p.stat().st_size > limit:
            return False
        with p.open("rb") as fh:
            return SCHEMA.encode() in fh.read()
    except OSError:
        return False


def find_record(doc: Any, depth: int = 0) -> dict | None:
    """The request_end record in a parsed line: the line itself, or nested in a log line."""
    if depth > 3:
        return None
    if isinstance(doc, dict):
        if doc.get("schema") == SCHEMA:
            return doc if doc.get("event_type") == EVENT else None
        for value in doc.values():
            found = find_record(value, depth + 1)
            if found is not None:
                return found
    elif isinstance(doc, str) and SCHEMA in doc and "{" in doc:
        try:
            return find_record(json.loads(doc[doc.index("{"):doc.rindex("}") + 1]), depth + 1)
        except ValueError:
            return None
    return None


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out if out == out and abs(out) != float("inf") else float("nan")


def _row(record: dict, source: str) -> dict | None:
    req = record.get("request")
    if not isinstance(req, dict) or not req.get("request_id"):
        return None
    worker = req.get("worker") if isinstance(req.get("worker"), dict) else {}
    row: dict[str, Any] = {"request_id": str(req["request_id"]),
                           "x_request_id": (str(req["x_request_id"])
                                            if req.get("x_request_id") is not None else None)}
    for f in FLOAT_FIELDS:
        row[f] = _float(req.get(f))
    for f in ("prefill_worker_id", "decode_worker_id"):
        row[f] = str(worker[f]) if worker.get(f) is not None else None
    row["source"] = source
    return row


def load_request_end(paths: str | Path | list[str | Path], required: bool = True
                     ) -> pd.DataFrame:
    """Every request_end record in the given files or folders (see the module docstring).

    ``required``: a path with no record at all is an error (BadInputError); otherwise such
    a path adds nothing.
    """
    import pandas as pd

    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[dict] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise BadInputError(f"Dynamo log {path} does not exist", hint=HINT)
        if not (path.is_dir() or path.is_file()):  # a FIFO, socket or device would block
            raise BadInputError(f"Dynamo log {path} is not a regular file or folder",
                                hint=HINT)
        found = 0
        for file in _files(path):
            for lineno, line in enumerate(_lines(file), start=1):
                if SCHEMA not in line:  # cheap: most log lines are not records
                    continue
                try:
                    doc = json.loads(line[line.index("{"):] if "{" in line else line)
                except ValueError:
                    log.debug("%s:%d: not JSON", file, lineno)
                    continue
                record = find_record(doc)
                row = _row(record, f"{file.name}:{lineno}") if record else None
                if row is not None:
                    rows.append(row)
                    found += 1
        if not found and required:
            raise BadInputError(f"no NVIDIA Dynamo request_end records ({SCHEMA}) in {path}",
                                hint=HINT)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for f in FLOAT_FIELDS:
        df[f] = df[f].astype("float64")
    return df.drop_duplicates("request_id", keep="last").reset_index(drop=True)
