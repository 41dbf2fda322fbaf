"""The cheap per-tick paths: field-value decoding, fixed-series blocks, kept-open IB files."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest
from fake_nvml import FakeNvml, replicate

from kvprof import semconv
from kvprof.collectors.base import NoData, Sample, SampleSet, SeriesKeys
from kvprof.collectors.infiniband import IbPortSampler
from kvprof.collectors.nvlink import NvlinkSampler, NvlinkStateSampler
from kvprof.collectors.nvml import NvmlSession, bulk_field_values, field_values
from kvprof.collectors.parquet_schema import read_samples
from kvprof.collectors.parquet_sink import ParquetSink

# (nvmlValueType_t, union member, value): every type NVML can answer with, extremes included
TYPED_VALUES = [
    (pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", -2.5),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 4_000_000_000),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, "ulVal", 2**40),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 2**63 + 4096),
    (pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -7),
    (pynvml.NVML_VALUE_TYPE_SIGNED_INT, "siVal", -3),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, "usVal", 65535),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 11),  # failed below
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 12),
]
EXPECTED = [-2.5, 4e9, 2.0**40, 2.0**63 + 4096, -7.0, -3.0, 65535.0, None, 12.0]


def answer():
    """A field-values answer as pynvml returns it: a ctypes array of nvmlFieldValue_t."""
    out = (pynvml.c_nvmlFieldValue_t * len(TYPED_VALUES))()
    for fv, (kind, member, value) in zip(out, TYPED_VALUES, strict=True):
        fv.valueType = kind
        setattr(fv.value, member, value)
    out[7].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
    return out


def test_both_decoders_read_every_value_type():
    values, codes = field_values(answer())
    assert codes == [0] * 7 + [pynvml.NVML_ERROR_NOT_SUPPORTED, 0]
    assert [v if c == 0 else None for v, c in zip(values, codes, strict=True)] == EXPECTED
    bulk, bulk_codes = bulk_field_values([answer(), answer()])  # two GPUs back to back
    assert bulk_codes.tolist() == codes * 2
    assert [v for v, c in zip(bulk.tolist(), bulk_codes.tolist(), strict=True) if c == 0] \
        == [v for v in EXPECTED if v is not None] * 2


def test_another_bindings_answer_is_read_member_by_member():
    # e.g. a binding returning plain objects: no bulk path, same numbers
    plain = [SimpleNamespace(nvmlReturn=fv.nvmlReturn, valueType=fv.valueType,
                             value=SimpleNamespace(**{member: getattr(fv.value, member)}))
             for fv, (_, member, _) in zip(answer(), TYPED_VALUES, strict=True)]
    assert bulk_field_values([plain]) is None
    assert field_values(plain) == field_values(answer())


class ListNvml(FakeNvml):
    """The fake, answering field values as a Python list of structs instead of an array."""

    def nvmlDeviceGetFieldValues(self, h, field_ids):  # noqa: N802
        return list(super().nvmlDeviceGetFieldValues(h, field_ids))


def test_nvlink_bulk_and_member_paths_agree(fixture_gpus):
    results = []
    for cls in (FakeNvml, ListNvml):
        fake = cls(replicate(fixture_gpus, 3), nvlink_links=4, nvlink_kib_per_s=3.0,
                   field_errors={(1, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX):
                                 pynvml.NVML_ERROR_NOT_SUPPORTED})
        fake.advance(2.0)
        results.append(NvlinkSampler(NvmlSession(fake)).sample())
    bulk, member = results
    assert bulk.all_samples() == member.all_samples()
    assert bulk.no_data == member.no_data
    # gpu1's TX failed on every link: 4 no-data, and its RX is still there
    assert {n.entity for n in bulk.no_data} == {f"gpu1/link{i}" for i in range(4)}
    assert len(bulk.all_samples()) == 3 * 4 * 2 - 4
    rx = {s.entity: s.value for s in bulk.all_samples() if s.metric == semconv.METRIC_NVLINK_RX}
    assert rx["gpu1/link2"] == 3.0 * 3 * 2.0 * 1024  # KiB/s x (link + 1) x s x 1024
    # the state (an unsigned int field, not a counter) decodes alike on both paths
    states = [NvlinkStateSampler(NvmlSession(cls(replicate(fixture_gpus, 3), nvlink_links=4)))
              .sample().all_samples() for cls in (FakeNvml, ListNvml)]
    assert states[0] == states[1] and len(states[0]) == 12
    assert {s.value for s in states[0]} == {1.0}


def test_block_leaves_out_missing_values_and_reuses_subsets():
    labels = {"gpu": "0"}
    keys = SeriesKeys([("m_a", "gpu0", labels, False), ("m_b", "gpu0", labels, True),
                       ("m_c", "gpu0", labels, False)])
    assert keys.labels_json == ('{"gpu":"0"}',) * 3
    first, second, empty = SampleSet("x", 1.0), SampleSet("x", 2.0), SampleSet("x", 3.0)
    first.add_block(keys, [1.0, None, 3.0])
    second.add_block(keys, [4.0, None, 6.0])
    empty.add_block(keys, [None, None, None])
    assert first.all_samples() == [Sample("m_a", 1.0, "gpu0", labels),
                                   Sample("m_c", 3.0, "gpu0", labels)]
    assert first.blocks[0].keys is second.blocks[0].keys  # memoised subset
    assert empty.blocks == [] and empty.sample_count() == 0
    assert first.ok and first.sample_count() == 2


def test_ib_counter_turning_bad_mid_run_then_recovering(ib_tree):
    sampler = IbPortSampler(ib_tree)
    path = ib_tree / "class/infiniband/mlx4_0/ports/1/counters/port_xmit_data"
    good = sampler.sample()
    assert sampler._fast is not None  # every descriptor open: the one-pass read is on
    path.write_text("N/A (no PMA)\n")
    bad = sampler.sample()
    assert [n for n in bad.no_data if n.entity == "mlx4_0/1"] == [
        NoData("mlx4_0/1", semconv.METRIC_IB_XMIT,
               "counters/port_xmit_data: not a number: 'N/A (no PMA)'")]
    def entities(result, metric):
        return {s.entity for s in result.all_samples() if s.metric == metric}

    # every other counter of every port is still there; that port has no xmit rate
    assert entities(bad, semconv.METRIC_IB_XMIT) == \
        entities(good, semconv.METRIC_IB_XMIT) - {"mlx4_0/1"}
    assert entities(bad, semconv.METRIC_IB_RCV) == entities(good, semconv.METRIC_IB_RCV)
    assert "mlx4_0/1" not in entities(bad, semconv.METRIC_IB_XMIT_RATE)
    assert "mlx4_0/1" in entities(bad, semconv.METRIC_IB_RCV_RATE)
    path.write_text("5\n")
    again = sampler.sample()
    xmit = {s.entity: s.value for s in again.all_samples()
            if s.metric == semconv.METRIC_IB_XMIT}
    assert xmit["mlx4_0/1"] == 20.0 and again.no_data == []
    sampler.close()


@pytest.mark.parametrize("max_series", [100_000, 3])
def test_parquet_rows_from_blocks_samples_and_no_data(tmp_path, monkeypatch, max_series):
    # A tiny MAX_SERIES forces the series table to reset between row groups.
    monkeypatch.setattr("kvprof.collectors.parquet_sink.MAX_SERIES", max_series)
    sink = ParquetSink(tmp_path, "n", rotate_s=60.0, flush_rows=5)
    labels = {"device": "mlx5_0", "port": "1"}
    keys = SeriesKeys([(semconv.METRIC_IB_XMIT, "mlx5_0/1", labels, True),
                       (semconv.METRIC_IB_RCV, "mlx5_0/1", labels, True)])
    for i in range(6):
        result = SampleSet("infiniband", 1_700_000_040.0 + i, duration_s=0.5)
        result.add_block(keys, [float(i), None if i == 3 else 10.0 * i])
        result.samples.append(Sample(semconv.METRIC_IB_ERRORS, float(i), "mlx5_0/1",
                                     {**labels, "counter": "symbol_error"}, counter=True))
        if i == 3:
            result.no_data.append(NoData("mlx5_0/1", semconv.METRIC_IB_RCV, "file empty"))
        sink.write(result)
    df = read_samples(sink.finish())
    assert len(df) == 6 * (3 + 2) - 1 + 1  # 3 values + 2 self rows each; one RCV -> no data
    rcv = df[df.metric == semconv.METRIC_IB_RCV].sort_values("ts")
    assert rcv.value.isna().tolist() == [False, False, False, True, False, False]
    assert rcv.iloc[3].labels == {"reason": "file empty"}
    assert rcv.iloc[5].value == 50.0 and rcv.iloc[5].labels == labels
    errors = df[df.metric == semconv.METRIC_IB_ERRORS]
    assert errors.value.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert errors.iloc[0].labels == {"counter": "symbol_error", **labels}
    duration = df[df.metric == semconv.METRIC_COLLECTOR_DURATION]
    assert duration.value.tolist() == [0.5] * 6 and set(duration.entity) == {"*"}
    assert set(df.collector) == {"infiniband"} and set(df.node) == {"n"}
    assert df.ts.is_monotonic_increasing and df.ts.dt.tz is not None
