"""NVLink sampler: per GPU and link, state, TX/RX data bytes and the device on the far end.

One ``nvmlDeviceGetFieldValues`` call per GPU per tick reads every link's state and data
counters (link number as the field's scope); the far end's PCI bus id changes only with a
reset, so it is read at discovery and refreshed rarely.
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
    decode_field_values,
    field_value,
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
    """Per-link NVLink state and TX/RX bytes (NVML counts KiB; exported in bytes)."""

    name = "nvlink"

    def __init__(self, session: NvmlSession):
        self.session = session
        self._links: dict[int, _GpuLinks] = {}

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _sample(self, result: SampleSet) -> None:
        if self.session.unavailable(result):
            return
        now = time.monotonic()
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
            self._sample_gpu(gpu, links, result)

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
            state_labels = {**labels, "remote_pci_bus_id": links.remote_bus_ids[link]}
            links.field_ids += [
                (nvml.NVML_FI_DEV_NVLINK_GET_STATE, link),
                (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link),
                (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link),
            ]
            rows += [
                (semconv.METRIC_NVLINK_UP, entity, state_labels, False),
                (semconv.METRIC_NVLINK_TX, entity, labels, True),
                (semconv.METRIC_NVLINK_RX, entity, labels, True),
            ]
        links.keys = SeriesKeys(rows)
        links.state = np.array([metric == semconv.METRIC_NVLINK_UP for metric, *_ in rows])
        links.scale = np.where(links.state, 0.0, float(KIB))
        return links

    def _sample_gpu(self, gpu: GpuDevice, links: _GpuLinks, result: SampleSet) -> None:
        nvml = self.session.nvml
        try:
            answer = nvml.nvmlDeviceGetFieldValues(gpu.handle, links.field_ids)
        except nvml.NVMLError as err:
            result.no_data.append(NoData(gpu.entity, ALL_METRICS, f"NVLink: "
                                         f"{nvml_reason(nvml, err)}"))
            return
        # The answer comes back in request order: no need to read fieldId / scopeId back.
        raw, codes = decode_field_values(answer)
        values = raw * links.scale
        # link state: NVML_NVLINK_STATE_ACTIVE (1) or not
        values[links.state] = raw[links.state] != 0
        out = values.tolist()
        failed = (codes != nvml.NVML_SUCCESS).nonzero()[0].tolist()
        for i in failed:  # rare: one field unsupported or not ready on this link
            err = nvml.NVMLError(int(codes[i]))
            keys = links.keys
            result.no_data.append(NoData(keys.entities[i], keys.metrics[i],
                                         nvml_reason(nvml, err)))
            out[i] = None
        result.add_block(links.keys, out)
