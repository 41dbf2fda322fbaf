"""NVLink samplers: per GPU and link, TX/RX data bytes, and state with the far end's device.

One ``nvmlDeviceGetFieldValues`` call per GPU per run reads every link's fields (link number
as the field's scope), and all GPUs' answers are decoded as one array. The data counters are
read every tick (:class:`NvlinkSampler`); link state changes rarely and is read at ~1 Hz by
:class:`NvlinkStateSampler` (like InfiniBand's split), which keeps a 10 Hz tick on an
8-GPU x 18-link node at 288 values instead of 432. The far end's PCI bus id changes only
with a reset, so it is read at discovery and refreshed rarely.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvprof import semconv
from kvprof.collectors.base import ALL_METRICS, NoData, SampleSet, SeriesKeys, timed_sample
from kvprof.collectors.nvml import (
    GpuDevice,
    NvmlSession,
    bulk_field_values,
    field_value,
    field_values,
    nvml_reason,
    nvml_text,
)

# The remote end of a link only changes across GPU/NVSwitch resets.
TOPOLOGY_REFRESH_S = 30.0
KIB = 1024


@dataclass(slots=True)
class _GpuLinks:
    links: list[int]
    remote_bus_ids: dict[int, str] = field(default_factory=dict)
    # Requested (field id, link) pairs, and per pair its series: built once at discovery so
    # a tick is one NVML call and a few array operations (~54 fields per GPU at 10 Hz).
    field_ids: list[tuple[int, int]] = field(default_factory=list)
    keys: SeriesKeys | None = None
    scale: Any = None  # float64 array: KiB -> bytes for TX/RX, 0 for link state
    state: Any = None  # bool array: which fields are link states
    refreshed: float = 0.0
    reason: str | None = None


class NvlinkSampler:
    """Per-link NVLink TX/RX data bytes (NVML counts KiB; exported in bytes), every tick."""

    name = "nvlink"
    # (NVML field id name, metric, counter, scale, with the far end's bus id as a label);
    # scale 0 marks a state (1 when the field is non-zero).
    FIELDS: tuple[tuple[str, str, bool, float, bool], ...] = (
        ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", semconv.METRIC_NVLINK_TX, True, KIB, False),
        ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", semconv.METRIC_NVLINK_RX, True, KIB, False),
    )

    def __init__(self, session: NvmlSession):
        self.session = session
        self._links: dict[int, _GpuLinks] = {}
        self._combos: dict[tuple[int, ...], tuple[tuple[_GpuLinks, ...], _GpuLinks]] = {}

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _sample(self, result: SampleSet) -> None:
        if self.session.unavailable(result):
            return
        nvml = self.session.nvml
        now = time.monotonic()
        batch: list[tuple[_GpuLinks, Any]] = []
        for gpu in self.session.devices:
            links = self._links.get(gpu.index)
            if links is None or now - links.refreshed > TOPOLOGY_REFRESH_S:
                fresh = self._discover(gpu, now)
                if (links is not None and links.keys is not None and fresh.keys is not None
                        and links.field_ids == fresh.field_ids
                        and links.keys.labels == fresh.keys.labels):
                    links.refreshed = now  # unchanged: keep the series and their caches
                else:
                    links = self._links[gpu.index] = fresh
            if links.reason:
                result.no_data.append(NoData(gpu.entity, ALL_METRICS, links.reason))
                continue
            try:
                batch.append((links, nvml.nvmlDeviceGetFieldValues(gpu.handle,
                                                                   links.field_ids)))
            except nvml.NVMLError as err:
                result.no_data.append(NoData(gpu.entity, ALL_METRICS,
                                             f"NVLink: {nvml_reason(nvml, err)}"))
        if batch:
            self._decode(batch, result)

    def _combined(self, parts: tuple[_GpuLinks, ...]) -> _GpuLinks:
        """The series of several GPUs back to back (memoised: the same GPUs answer every
        tick), so all their answers are decoded as one array."""
        key = tuple(map(id, parts))
        entry = self._combos.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], parts, strict=True)):
            import numpy as np

            if len(self._combos) > 16:
                self._combos.clear()
            combined = _GpuLinks([])
            combined.keys = SeriesKeys.join([p.keys for p in parts])
            combined.scale = np.concatenate([p.scale for p in parts])
            combined.state = np.concatenate([p.state for p in parts])
            entry = self._combos[key] = (parts, combined)
        return entry[1]

    def _decode(self, batch: list[tuple[_GpuLinks, Any]], result: SampleSet) -> None:
        import numpy as np

        nvml = self.session.nvml
        links = batch[0][0] if len(batch) == 1 else self._combined(
            tuple(part for part, _ in batch))
        # Answers come back in request order: no need to read fieldId / scopeId back.
        decoded = bulk_field_values([answer for _, answer in batch])
        if decoded is None:
            values, codes = [], []
            for _, answer in batch:
                v, c = field_values(answer)
                values += v
                codes += c
            decoded = np.asarray(values), np.asarray(codes)
        raw, codes = decoded
        values = raw * links.scale
        if links.state.any():  # link state: NVML_NVLINK_STATE_ACTIVE (1) or not
            values[links.state] = raw[links.state] != 0
        out = values.tolist()
        if (codes != nvml.NVML_SUCCESS).any():  # rare: a field unsupported on some link
            keys = links.keys
            for i in (codes != nvml.NVML_SUCCESS).nonzero()[0].tolist():
                err = nvml.NVMLError(int(codes[i]))
                result.no_data.append(NoData(keys.entities[i], keys.metrics[i],
                                             nvml_reason(nvml, err)))
                out[i] = None
        result.add_block(links.keys, out)

    def _discover(self, gpu: GpuDevice, now: float) -> _GpuLinks:
        import numpy as np

        nvml = self.session.nvml
        try:
            (count_fv,) = nvml.nvmlDeviceGetFieldValues(
                gpu.handle, [nvml.NVML_FI_DEV_NVLINK_LINK_COUNT]
            )
        except nvml.NVMLError as err:
            return _GpuLinks([], refreshed=now, reason=f"NVLink: {nvml_reason(nvml, err)}")
        if count_fv.nvmlReturn != nvml.NVML_SUCCESS:
            err = nvml.NVMLError(count_fv.nvmlReturn)
            return _GpuLinks([], refreshed=now, reason=f"NVLink: {nvml_reason(nvml, err)}")
        count = int(field_value(nvml, count_fv))
        if count == 0:
            return _GpuLinks([], refreshed=now, reason="NVLink: this GPU has no NVLink links")
        links = _GpuLinks(list(range(count)), refreshed=now)
        rows = []
        for link in links.links:
            try:
                remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(gpu.handle, link)
                links.remote_bus_ids[link] = nvml_text(remote.busId)
            except nvml.NVMLError:
                links.remote_bus_ids[link] = ""  # link down or not wired: no far end
            entity = f"{gpu.entity}/link{link}"
            labels = {"gpu": str(gpu.index), "uuid": gpu.uuid, "link": str(link)}
            remote_labels = {**labels, "remote_pci_bus_id": links.remote_bus_ids[link]}
            for field_name, metric, counter, _, remote in self.FIELDS:
                links.field_ids.append((getattr(nvml, field_name), link))
                rows.append((metric, entity, remote_labels if remote else labels, counter))
        links.keys = SeriesKeys(rows)
        scales = [scale for _ in links.links for _, _, _, scale, _ in self.FIELDS]
        links.scale = np.array(scales, dtype=np.float64)
        links.state = links.scale == 0
        return links


class NvlinkStateSampler(NvlinkSampler):
    """Per-link NVLink state, 1 when active, labelled with the far end's PCI bus id (~1 Hz)."""

    name = "nvlink_state"
    FIELDS = (("NVML_FI_DEV_NVLINK_GET_STATE", semconv.METRIC_NVLINK_UP, False, 0.0, True),)
