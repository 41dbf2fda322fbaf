"""Parquet sink: long-format sample rows in time-rotated files, each written as .tmp then renamed.

Schema and naming: see :mod:`kvprof.collectors.parquet_schema`. A write failure (unwritable
directory, disk full) is reported once on stderr via logging, the rest of that file's window is
dropped, and the next window tries again; the caller keeps sampling and serving /metrics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from kvprof import semconv
from kvprof.collectors.base import WHOLE_COLLECTOR, SampleSet, encode_labels
from kvprof.collectors.parquet_schema import FILE_PREFIX, FILE_SUFFIX, TEMP_SUFFIX, arrow_schema

log = logging.getLogger(__name__)

# Rows buffered in memory before they go to the open file as one row group: bounds memory
# at 10 Hz on an 8-GPU node (~700 rows per tick) to a few MB.
FLUSH_ROWS = 20_000
FLUSH_S = 5.0
# The two self-metric rows every SampleSet gets (entity "*", no labels).
SELF_METRICS = (semconv.METRIC_COLLECTOR_DURATION, semconv.METRIC_COLLECTOR_SUCCESS)
SELF_ENTITIES = (WHOLE_COLLECTOR, WHOLE_COLLECTOR)
SELF_LABELS = ("{}", "{}")


class ParquetSink:
    """Appends SampleSets as rows; rotates every ``rotate_s`` seconds of sample time."""

    def __init__(self, directory: Path | str, node: str, rotate_s: float = 60.0,
                 flush_rows: int = FLUSH_ROWS, flush_s: float | None = None):
        # Imported now, not at the first flush: the import takes ~0.5-1.5 s, which would
        # make the first ticks of the 10 Hz loop late.
        import pyarrow.parquet  # noqa: F401

        self.directory = Path(directory)
        self.node = node
        self.rotate_s = rotate_s
        self.flush_rows = flush_rows
        # Rows also go to disk at least this often (sample time), so a crash loses little.
        self.flush_s = flush_s if flush_s is not None else min(FLUSH_S, rotate_s / 2)
        self._flushed_ts = 0.0
        self.files_written: list[Path] = []
        self.write_errors = 0
        self._window: int | None = None
        self._failed_window: int | None = None
        self._writer: Any = None
        self._temp: Path | None = None
        self._final: Path | None = None
        self._cols: dict[str, list] = self._empty()
        self._label_json: dict[int, tuple[dict[str, str], str]] = {}
        self._reason_json: dict[str, str] = {}
        # Collectors that record only on change (placement): re-written at each file start,
        # so every file says where things were.
        self._sticky: dict[str, SampleSet] = {}

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"ts": [], "collector": [], "entity": [], "metric": [], "value": [], "labels": []}

    def _labels(self, labels: dict[str, str]) -> str:
        """JSON text of a label dict, cached by object identity: samplers reuse one labels
        dict per series, so at 10 Hz nearly every lookup is a hit. The cache holds the dict
        itself, so an id is never reused while its entry exists."""
        entry = self._label_json.get(id(labels))
        if entry is not None and entry[0] is labels:
            return entry[1]
        if len(self._label_json) > 100_000:  # PIDs come and go: do not grow forever
            self._label_json.clear()
        text = encode_labels(labels)
        self._label_json[id(labels)] = (labels, text)
        return text

    def _reason(self, reason: str) -> str:
        """JSON text of a no-data row's labels; the same few reasons repeat every tick."""
        text = self._reason_json.get(reason)
        if text is None:
            if len(self._reason_json) > 10_000:
                self._reason_json.clear()
            text = self._reason_json[reason] = encode_labels({"reason": reason})
        return text

    def write(self, result: SampleSet, *, sticky: bool = False) -> None:
        """Add one SampleSet; for ``sticky`` collectors only changed sets are new rows."""
        if sticky and not result.changed and result.collector in self._sticky:
            return
        window = math.floor(result.ts / self.rotate_s)
        if self._window is None or window > self._window:
            self._rotate(window)
        else:
            # A clock stepped back must not reopen (and overwrite) an earlier file.
            window = self._window
        if sticky:
            self._sticky[result.collector] = result
        if window == self._failed_window:
            return
        self._append(result)
        if len(self._cols["ts"]) >= self.flush_rows or result.ts - self._flushed_ts >= self.flush_s:
            self._flushed_ts = result.ts
            self._flush()

    def _append(self, result: SampleSet) -> None:
        # Per tick only C-level list extends: fixed series (blocks) bring their metric,
        # entity and encoded-labels columns ready made; Arrow sees the rows at flush time.
        metric, value, entity, labels = (self._cols[c] for c in ("metric", "value", "entity",
                                                                   "labels"))
        start = len(metric)
        for block in result.blocks:
            keys = block.keys
            metric += keys.metrics
            entity += keys.entities
            labels += keys.labels_json
            value += block.values
        if result.samples:
            metrics, values, entities, label_dicts, _ = zip(*result.samples, strict=True)
            metric += metrics
            value += values
            entity += entities
            label_text = self._labels
            labels += [label_text(x) for x in label_dicts]
        for nd in result.no_data:
            entity.append(nd.entity)
            metric.append(nd.metric)
            value.append(None)
            labels.append(self._reason(nd.reason))
        metric += SELF_METRICS
        entity += SELF_ENTITIES
        labels += SELF_LABELS
        value += (result.duration_s, 1.0 if result.ok else 0.0)
        n = len(metric) - start
        self._cols["ts"] += [int(result.ts * 1e9)] * n
        self._cols["collector"] += [result.collector] * n

    def _rotate(self, window: int) -> None:
        self.finish()
        self._window = window
        start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(window * self.rotate_s))
        self._final = self.directory / f"{FILE_PREFIX}{self.node}-{start}{FILE_SUFFIX}"
        self._temp = self._final.with_name(self._final.name + TEMP_SUFFIX)
        for result in self._sticky.values():
            self._append(result)

    def _flush(self) -> None:
        if not self._cols["ts"] or self._window == self._failed_window:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema()
        cols = self._cols
        self._cols = self._empty()
        try:
            table = pa.table(
                {
                    "ts": pa.array(cols["ts"], pa.timestamp("ns", tz="UTC")),
                    "node": pa.array([self.node] * len(cols["ts"]), pa.string()),
                    "collector": pa.array(cols["collector"], pa.string()),
                    "entity": pa.array(cols["entity"], pa.string()),
                    "metric": pa.array(cols["metric"], pa.string()),
                    "value": pa.array(cols["value"], pa.float64()),
                    "labels": pa.array(cols["labels"], pa.string()),
                },
                schema=schema,
            )
            if self._writer is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(str(self._temp), schema, compression="zstd")
            self._writer.write_table(table)
        except OSError as err:
            self._fail(err)

    def _fail(self, err: OSError) -> None:
        self.write_errors += 1
        self._failed_window = self._window
        log.error(
            "Error: cannot write Parquet file %s: %s\n"
            "Hint: make --output a writable directory with free space; still serving "
            "/metrics, the next file is tried in %.0f s",
            self._final, err.strerror or err, self.rotate_s,
        )
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                log.debug("closing the failed writer also failed", exc_info=True)
            self._writer = None
        if self._temp is not None:
            try:
                self._temp.unlink(missing_ok=True)
            except OSError:
                log.debug("could not remove %s", self._temp)

    def finish(self) -> Path | None:
        """Write out the current file and rename it to its final name; returns that name."""
        if self._window is None:
            return None
        self._flush()
        done = None
        if self._writer is not None:
            try:
                self._writer.close()
                os.replace(self._temp, self._final)
                done = self._final
                self.files_written.append(done)
                log.info("wrote %s", done)
            except OSError as err:
                self._writer = None
                self._fail(err)
        self._writer = None
        self._cols = self._empty()
        self._window = None
        return done

    close = finish
