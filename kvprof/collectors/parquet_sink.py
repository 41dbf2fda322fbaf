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
from array import array
from pathlib import Path
from typing import Any

from kvprof import semconv
from kvprof.collectors.base import WHOLE_COLLECTOR, SampleSet, encode_labels
from kvprof.collectors.parquet_schema import FILE_PREFIX, FILE_SUFFIX, TEMP_SUFFIX, arrow_schema

log = logging.getLogger(__name__)

# Rows go to the open file as one row group every FLUSH_S of sample time (an 8-GPU node
# with 18 NVLink links each makes ~430 rows per 10 Hz tick: ~22k rows, ~10 ms of Arrow and
# Parquet work), or at FLUSH_ROWS rows, whichever comes first: bounds memory to a few MB.
FLUSH_ROWS = 50_000
FLUSH_S = 5.0
# Series interned since the last reset; reset between files beyond this (PIDs come and go).
MAX_SERIES = 100_000
# Min/max statistics only where a reader prunes by them (time windows), dictionary pages only
# for the repetitive strings: statistics of strings and dictionary attempts on floats cost
# ~40 % of a row group's write (and the dictionary-free ts/value pages come out smaller).
WRITER_OPTIONS = {
    "compression": "zstd",
    "write_statistics": ["ts"],
    "use_dictionary": ["node", "collector", "entity", "metric", "labels"],
}


class _Rows:
    """Rows waiting for the next row group, kept as cheaply as a 10 Hz tick allows.

    A row is (series code, value); a SampleSet is one run (timestamp, collector, row count).
    A series code stands for a (metric, entity, labels JSON) triple, interned once; a block of
    fixed series brings its codes ready made. So a tick costs a few C-level list extends, and
    the string columns are materialised by Arrow (take) when the row group is written.
    """

    def __init__(self) -> None:
        self.codes = array("i")
        self.values: list[float | None] = []
        self.run_ts: list[int] = []
        self.run_collector: list[int] = []
        self.run_rows: list[int] = []
        self._reset_series()

    def _reset_series(self) -> None:
        self.series: dict[tuple[str, str, str], int] = {}
        self.series_columns: tuple[list[str], list[str], list[str]] = ([], [], [])
        self.collectors: dict[str, int] = {}
        self._block_codes: dict[int, tuple[Any, array]] = {}
        self._label_json: dict[int, tuple[dict[str, str], str]] = {}
        self._nodata_codes: dict[tuple[str, str, str], int] = {}
        self._self_codes: dict[str, array] = {}

    def __len__(self) -> int:
        return len(self.values)

    def code(self, metric: str, entity: str, labels_json: str) -> int:
        key = (metric, entity, labels_json)
        code = self.series.get(key)
        if code is None:
            code = self.series[key] = len(self.series)
            for column, text in zip(self.series_columns, key, strict=True):
                column.append(text)
        return code

    def labels(self, labels: dict[str, str]) -> str:
        """JSON text of a label dict, cached by object identity: samplers reuse one labels
        dict per series. The cache holds the dict, so an id is not reused while cached."""
        entry = self._label_json.get(id(labels))
        if entry is not None and entry[0] is labels:
            return entry[1]
        if len(self._label_json) > MAX_SERIES:  # a sampler making new dicts: do not grow
            self._label_json.clear()
        text = encode_labels(labels)
        self._label_json[id(labels)] = (labels, text)
        return text

    def add(self, result: SampleSet) -> None:
        codes, values = self.codes, self.values
        start = len(values)
        for block in result.blocks:
            keys = block.keys
            entry = self._block_codes.get(id(keys))
            if entry is None or entry[0] is not keys:
                if len(self._block_codes) > 1000:
                    self._block_codes.clear()
                entry = self._block_codes[id(keys)] = (keys, array("i", [
                    self.code(m, e, j)
                    for m, e, j in zip(keys.metrics, keys.entities, keys.labels_json,
                                       strict=True)]))
            codes += entry[1]
            values += block.values
        for s in result.samples:
            codes.append(self.code(s.metric, s.entity, self.labels(s.labels)))
            values.append(s.value)
        for nd in result.no_data:
            code = self._nodata_codes.get(nd)
            if code is None:
                code = self._nodata_codes[nd] = self.code(
                    nd.metric, nd.entity, encode_labels({"reason": nd.reason}))
            codes.append(code)
            values.append(None)
        own = self._self_codes.get(result.collector)
        if own is None:
            own = self._self_codes[result.collector] = array("i", [
                self.code(semconv.METRIC_COLLECTOR_DURATION, WHOLE_COLLECTOR, "{}"),
                self.code(semconv.METRIC_COLLECTOR_SUCCESS, WHOLE_COLLECTOR, "{}")])
        codes += own
        values += (result.duration_s, 1.0 if result.ok else 0.0)
        collector = self.collectors.get(result.collector)
        if collector is None:
            collector = self.collectors[result.collector] = len(self.collectors)
        self.run_ts.append(int(result.ts * 1e9))
        self.run_collector.append(collector)
        self.run_rows.append(len(values) - start)

    def take_table(self, node: str) -> Any:
        """The pending rows as an Arrow table of the documented schema; empties the buffer."""
        import numpy as np
        import pyarrow as pa

        rows = np.array(self.run_rows, dtype=np.int64)
        codes = pa.array(np.frombuffer(self.codes, dtype=np.int32))
        metrics, entities, labels = (pa.array(c, pa.string()) for c in self.series_columns)
        names = pa.array(sorted(self.collectors, key=self.collectors.get), pa.string())
        ts = np.repeat(np.array(self.run_ts, dtype=np.int64), rows)
        collector = np.repeat(np.array(self.run_collector, dtype=np.int32), rows)
        table = pa.table(
            {
                "ts": pa.array(ts, pa.timestamp("ns", tz="UTC")),
                "node": pa.repeat(pa.scalar(node, pa.string()), len(self.values)),
                "collector": names.take(pa.array(collector)),
                "entity": entities.take(codes),
                "metric": metrics.take(codes),
                "value": pa.array(self.values, pa.float64()),
                "labels": labels.take(codes),
            },
            schema=arrow_schema(),
        )
        self.clear()
        return table

    def clear(self) -> None:
        self.codes = array("i")
        self.values = []
        self.run_ts, self.run_collector, self.run_rows = [], [], []
        if len(self.series) > MAX_SERIES:  # only here, between row groups: no row refers
            self._reset_series()


class ParquetSink:
    """Appends SampleSets as rows; rotates every ``rotate_s`` seconds of sample time."""

    def __init__(self, directory: Path | str, node: str, rotate_s: float = 60.0,
                 flush_rows: int = FLUSH_ROWS, flush_s: float | None = None):
        # Imported and warmed now, not at the first flush: the imports and the first
        # Array.take (compute kernel registry) take ~0.5-3 s, which would make ticks late.
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401

        pa.array([""]).take(pa.array([0]))

        self.directory = Path(directory)
        self.node = node
        self.rotate_s = rotate_s
        self.flush_rows = flush_rows
        # Rows also go to disk at least this often (sample time), so a crash loses little.
        self.flush_s = flush_s if flush_s is not None else min(FLUSH_S, rotate_s / 2)
        self._flushed_ts = 0.0
        self.files_written: list[Path] = []
        self.write_errors = 0
        self.last_error = ""
        self._window: int | None = None
        self._failed_window: int | None = None
        self._writer: Any = None
        self._temp: Path | None = None
        self._final: Path | None = None
        self._rows = _Rows()
        # Collectors that record only on change (placement): re-written at each file start,
        # so every file says where things were.
        self._sticky: dict[str, SampleSet] = {}

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
        self._rows.add(result)
        if len(self._rows) >= self.flush_rows or result.ts - self._flushed_ts >= self.flush_s:
            self._flushed_ts = result.ts
            self._flush()

    def _rotate(self, window: int) -> None:
        self.finish()
        self._window = window
        start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(window * self.rotate_s))
        self._final = self.directory / f"{FILE_PREFIX}{self.node}-{start}{FILE_SUFFIX}"
        self._temp = self._final.with_name(self._final.name + TEMP_SUFFIX)
        for result in self._sticky.values():
            self._rows.add(result)

    def _flush(self) -> None:
        """Write the pending rows as one row group (every few seconds, and at rotation)."""
        if not len(self._rows) or self._window == self._failed_window:
            return
        import pyarrow.parquet as pq

        table = self._rows.take_table(self.node)
        try:
            if self._writer is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(str(self._temp), table.schema,
                                                **WRITER_OPTIONS)
            self._writer.write_table(table)
        except OSError as err:
            self._fail(err)

    def _fail(self, err: OSError) -> None:
        self.write_errors += 1
        self.last_error = str(err.strerror or err)
        self._failed_window = self._window
        # Not an "Error:" line: the run goes on; the exit status and the one Error/Hint at
        # the end say that files are missing (issue 21).
        log.error(
            "cannot write Parquet file %s: %s; still serving /metrics, the next file is "
            "tried in %.0f s (make --output a writable directory with free space)",
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
        self._rows.clear()
        self._window = None
        return done

    close = finish
