"""The one small interface every node sampler implements: typed samples or explicit no-data."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

# Marks a NoData that covers every metric of an entity (or of the whole collector).
ALL_METRICS = "*"
# Entity of a NoData that covers the whole collector (no library, no device tree, ...).
WHOLE_COLLECTOR = "*"


class Sample(NamedTuple):
    """One value of one metric for one entity (a GPU, a link, a port, a NIC) at one time.

    Samplers whose series are fixed (GPUs, links, ports) emit :class:`SampleBlock` values
    instead; a Sample is built for them only when a consumer asks (scrape, --once, tests).
    """

    metric: str
    value: float
    entity: str
    labels: dict[str, str]
    counter: bool = False


class NoData(NamedTuple):
    """An explicit 'no data' for an entity / metric, with the reason a person can act on."""

    entity: str
    metric: str
    reason: str


def encode_labels(labels: dict[str, str]) -> str:
    """The stored form of a label set: compact JSON, keys sorted (the Parquet ``labels``)."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


class SeriesKeys:
    """The fixed identities (metric, entity, labels, counter) of a run of series, in order.

    Built once when a sampler discovers its GPUs / links / ports and reused every tick, so a
    tick produces one list of values rather than ~600 Sample objects, and what sinks derive
    from an identity (the labels JSON of a Parquet row) is computed once per series, not
    once per row (bench/collector_cost.py).
    """

    __slots__ = ("metrics", "entities", "labels", "counters", "_labels_json", "_subsets")

    def __init__(self, rows: Iterable[tuple[str, str, dict[str, str], bool]]):
        rows = list(rows)
        self.metrics: tuple[str, ...] = tuple(r[0] for r in rows)
        self.entities: tuple[str, ...] = tuple(r[1] for r in rows)
        self.labels: tuple[dict[str, str], ...] = tuple(r[2] for r in rows)
        self.counters: tuple[bool, ...] = tuple(r[3] for r in rows)
        self._labels_json: tuple[str, ...] | None = None
        self._subsets: dict[tuple[int, ...], SeriesKeys] = {}

    def __len__(self) -> int:
        return len(self.metrics)

    @classmethod
    def join(cls, parts: Iterable[SeriesKeys]) -> SeriesKeys:
        """The series of ``parts`` back to back."""
        return cls(row for keys in parts for row in zip(
            keys.metrics, keys.entities, keys.labels, keys.counters, strict=True))

    @property
    def labels_json(self) -> tuple[str, ...]:
        if self._labels_json is None:
            self._labels_json = tuple(encode_labels(x) for x in self.labels)
        return self._labels_json

    def subset(self, present: tuple[int, ...]) -> SeriesKeys:
        """The keys at the ``present`` positions; memoised, as the same values tend to be
        missing tick after tick (e.g. utilisation "N/A" on a MIG-enabled GPU)."""
        keys = self._subsets.get(present)
        if keys is None:
            if len(self._subsets) > 64:  # flapping failures: bound the memo
                self._subsets.clear()
            keys = SeriesKeys((self.metrics[i], self.entities[i], self.labels[i],
                               self.counters[i]) for i in present)
            self._subsets[present] = keys
        return keys


class SampleBlock(NamedTuple):
    """Values of fixed series, ``values[i]`` belonging to ``keys`` row i."""

    keys: SeriesKeys
    values: list[float]

    def samples(self) -> list[Sample]:
        k = self.keys
        return list(map(Sample._make, zip(k.metrics, self.values, k.entities, k.labels,
                                          k.counters, strict=True)))


@dataclass(slots=True)
class SampleSet:
    """What one sampler produced in one tick; ``ok`` is False only when it produced nothing.

    Values are in ``samples`` (one object each) and/or ``blocks`` (fixed series, one value
    list per block); :meth:`all_samples` gives both as Samples.
    """

    collector: str
    ts: float
    samples: list[Sample] = field(default_factory=list)
    no_data: list[NoData] = field(default_factory=list)
    duration_s: float = 0.0
    # For samplers that record only on change (placement): False means "same as last time".
    changed: bool = True
    blocks: list[SampleBlock] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.samples) or bool(self.blocks) or not self.no_data

    def add_block(self, keys: SeriesKeys, values: Sequence[float | None]) -> None:
        """Add the values of ``keys``; a None is a value not read this tick (the sampler
        records the NoData saying why) and its series is left out."""
        if None in values:
            present = tuple([i for i, v in enumerate(values) if v is not None])
            if not present:
                return
            keys = keys.subset(present)
            values = [values[i] for i in present]
        elif not values:
            return
        self.blocks.append(SampleBlock(keys, values if isinstance(values, list) else list(values)))

    def all_samples(self) -> list[Sample]:
        out = list(self.samples)
        for block in self.blocks:
            out.extend(block.samples())
        return out

    def sample_count(self) -> int:
        return len(self.samples) + sum(len(b.values) for b in self.blocks)


class Sampler(Protocol):
    """A node sampler: ``sample()`` never raises; failures become NoData entries."""

    name: str

    def sample(self) -> SampleSet: ...


def timed_sample(sampler_name: str, body) -> SampleSet:  # noqa: ANN001 - body: SampleSet -> None
    """Run ``body(result)`` and stamp the wall time and the sampler's own CPU-cheap duration.

    Any exception that escapes a sampler's body is a bug, but a daemon tick must survive it:
    it becomes one whole-collector NoData with the exception text.
    """
    result = SampleSet(collector=sampler_name, ts=time.time())
    start = time.perf_counter()
    try:
        body(result)
    except Exception as err:  # noqa: BLE001 - never raise out of a tick (DESIGN.md)
        result.no_data.append(
            NoData(WHOLE_COLLECTOR, ALL_METRICS, f"internal error: {type(err).__name__}: {err}")
        )
    result.duration_s = time.perf_counter() - start
    return result
