"""Property-based fuzzing (Hypothesis) of every loader and the commands' numeric options:
whatever the input, a result or a KvprofError (one Error:/Hint: at the CLI), nothing else.

Deterministic (derandomize, a fixed number of examples, no deadline): stable in CI."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvprof.errors import EXIT_USAGE, KvprofError, UsageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def _dump(value) -> str:
    return json.dumps(value)  # NaN / Infinity as Python writes them: what the files may hold


_SCRATCH = tempfile.TemporaryDirectory(prefix="kvprof-fuzz-")


@pytest.fixture(scope="module", autouse=True)
def _scratch():
    """Every generated file lives under one folder, removed after the module."""
    yield
    _SCRATCH.cleanup()


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(dir=_SCRATCH.name))


def _in_file(text: str | bytes, name: str) -> Path:
    d = _tmpdir()
    p = d / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _result_or_kvprof_error(fn, *args):
    try:
        return fn(*args)
    except KvprofError as err:
        assert err.message and "internal error" not in err.message
        return None


# Mutations of real documents reach deeper than random JSON would.
def _otlp(span_fields: dict) -> dict:
    span = {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "2", "name": "x",
            "startTimeUnixNano": "1761000000000000000",
            "endTimeUnixNano": "1761000000100000000", "attributes": []}
    span.update(span_fields)
    return {"resourceSpans": [{"resource": {"attributes": []},
                               "scopeSpans": [{"spans": [span]}]}]}


span_fields = st.dictionaries(
    st.sampled_from(["traceId", "spanId", "parentSpanId", "name", "startTimeUnixNano",
                     "endTimeUnixNano", "attributes", "status", "kind"]), json_values,
    max_size=3)


@FUZZ
@given(doc=st.one_of(json_values, span_fields.map(_otlp)), lines=st.integers(1, 3))
def test_trace_loaders(doc, lines):
    from kvprof.analysis.loaders.traces import load_records, load_spans

    p = _in_file("\n".join([_dump(doc)] * lines) + "\n", "t.jsonl")
    _result_or_kvprof_error(load_spans, p)
    _result_or_kvprof_error(load_records, p)


@FUZZ
@given(metrics=st.dictionaries(st.sampled_from(["time_to_first_token", "request_latency",
                                                "inter_token_latency", "ttft"]),
                               st.one_of(json_values, st.fixed_dictionaries(
                                   {"value": json_values, "unit": st.sampled_from(
                                       ["ms", "ns", "s", "x"])})), max_size=3),
       meta=st.dictionaries(st.sampled_from(["request_start_ns", "x_request_id"]),
                            json_values, max_size=2))
def test_aiperf_records(metrics, meta):
    from kvprof.analysis.loaders.aiperf import load_aiperf_records

    p = _in_file(_dump({"metadata": meta, "metrics": metrics}) + "\n", "profile_export.jsonl")
    frame = _result_or_kvprof_error(load_aiperf_records, p)
    if frame is not None:  # no value out of range is ever a result
        for col in ("ttft_ms", "request_latency_ms", "itl_ms"):
            vals = frame[col].dropna()
            assert ((vals >= 0) & (vals <= 1e9)).all(), (col, list(vals))


@FUZZ
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"time_to_first_token": st.one_of(json_values, st.dictionaries(
        st.sampled_from(["avg", "p99", "unit"]), json_values, max_size=3)),
     "request_latency": st.dictionaries(st.sampled_from(["avg", "p50"]), numbers, max_size=2)})))
def test_aiperf_summary(doc):
    from kvprof.analysis.loaders.aiperf import load_aiperf_summary

    s = _result_or_kvprof_error(load_aiperf_summary, _in_file(_dump(doc),
                                                              "profile_export_aiperf.json"))
    if s is not None:
        for stats in s.values() if hasattr(s, "values") else []:
            for v in stats.values():
                assert math.isfinite(v) and v >= 0


@FUZZ
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"steps": st.dictionaries(st.sampled_from(["gather", "transfer", "total"]),
                              st.one_of(json_values, st.dictionaries(
                                  st.sampled_from(["median_ms", "gbps"]), numbers)),
                              max_size=3),
     "geometry": json_values, "links": json_values})))
def test_microbench_results(doc):
    from kvprof.analysis.loaders.microbench_results import load_microbench

    cost = _result_or_kvprof_error(load_microbench, _in_file(_dump(doc), "mb.json"))
    if cost is not None:
        for stats in cost.steps.values():
            assert all(math.isfinite(v) and v >= 0 for v in stats.values())


@FUZZ
@given(cfg=st.one_of(json_values, st.dictionaries(
    st.sampled_from(["num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "hidden_size"]), json_values, max_size=5)),
       raw=st.binary(max_size=40))
def test_model_config(cfg, raw):
    from kvprof.model import load_hf_config

    shape = _result_or_kvprof_error(load_hf_config, _in_file(_dump(cfg), "config.json"))
    if shape is not None:
        assert 0 < shape.layers <= 100_000 and shape.kv_heads > 0 and shape.head_dim > 0
    _result_or_kvprof_error(load_hf_config, _in_file(raw, "config.json"))


@FUZZ
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"kind": st.just("PodList"), "items": st.lists(st.fixed_dictionaries(
        {"kind": st.just("Pod"), "metadata": json_values, "spec": json_values,
         "status": json_values}), max_size=2)})))
def test_pods(doc):
    from kvprof.analysis.placement import load_offline

    _result_or_kvprof_error(load_offline, _in_file(_dump(doc), "pods.json"), None, None, None)


@FUZZ
@given(values=st.lists(st.one_of(st.text(alphabet="0123456789.eE+-nainf", max_size=8),
                                 numbers.map(str)), min_size=1, max_size=3))
def test_vllm_log_and_metrics(values):
    from kvprof.analysis.loaders.vllm_metrics import parse_kv_transfer_log, parse_nixl_prometheus

    line = ("KV Transfer metrics: " + ", ".join(
        f"{k}={v}" for k, v in zip(["Num successful transfers", "Avg xfer time (ms)",
                                    "Throughput (MB/s)"], values, strict=False)))
    log = _result_or_kvprof_error(parse_kv_transfer_log, _in_file(line + "\n", "v.log"))
    if log is not None:
        nums = log.drop(columns=["line"]).stack().dropna()
        assert ((nums >= 0) & (nums <= 1e15)).all()
    text = "".join(f'vllm:nixl_xfer_time_seconds_sum{{engine="{i}"}} {v}\n'
                   for i, v in enumerate(values))
    _result_or_kvprof_error(parse_nixl_prometheus, _in_file(text, "m.prom"))


@FUZZ
@given(ts=st.sampled_from(["float", "str", "int"]), value=st.sampled_from(["float", "str"]),
       text=st.sampled_from(["str", "int"]), cut=st.integers(0, 2000))
def test_samples(ts, value, text, cut):
    import pandas as pd

    from kvprof.analysis.loaders.samples import load_samples

    def col(kind, good):
        return {"float": [1.5, 2.5], "str": ["a", "b"], "int": [1, 2]}.get(kind, good)

    df = pd.DataFrame({"ts": col(ts, None), "node": col(text, None), "collector": ["c", "c"],
                       "entity": ["e", "e"], "metric": ["m", "m"], "value": col(value, None),
                       "labels": ["{}", "{}"]})
    d = _tmpdir()
    df.to_parquet(d / "s.parquet")
    if cut:
        data = (d / "s.parquet").read_bytes()
        (d / "s.parquet").write_bytes(data[:cut])
    _result_or_kvprof_error(load_samples, d)


# --- numeric options --------------------------------------------------------------------------

option_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.integers(-(2**40), 2**40))


@FUZZ
@given(v=option_values)
def test_option_number(v):
    from kvprof.inputs import option_number

    ok = math.isfinite(v) and 0 < v <= 3600
    if ok:
        option_number(v, "--interval", maximum=3600)
    else:
        with pytest.raises(UsageError) as err:
            option_number(v, "--interval", maximum=3600)
        assert err.value.exit_code == EXIT_USAGE and "--interval" in err.value.message


@FUZZ
@given(tokens=st.integers(-(2**40), 2**40), block=st.integers(-10, 2**20))
def test_geometry_options(tokens, block):
    from kvprof.model import resolve_geometry

    try:
        g = resolve_geometry(tokens, model="qwen3-0.6b", block_size=block)
    except UsageError as err:
        assert err.hint
        assert not (0 < tokens <= 10_000_000 and 0 < block <= 65_536)
    else:
        assert g.tokens == tokens


@FUZZ
@given(duration=option_values, interval=option_values, rotate=option_values)
def test_collect_options_fail_before_work(duration, interval, rotate):
    from kvprof.collectors.daemon import run_collect_command

    bad = not (math.isfinite(interval) and 0 < interval <= 3600) or not (
        math.isfinite(rotate) and 0 < rotate <= 7 * 86400) or not (
        math.isfinite(duration) and duration >= 0)
    if not bad:
        return  # a valid set would start sampling; the corpus runs real ones
    with pytest.raises(UsageError):
        run_collect_command(interval=interval, rotate=rotate, duration=duration,
                            listen="", output=None, no_nvml=True)


@FUZZ
@given(duration=option_values, size=st.one_of(st.text(max_size=8), numbers.map(str)))
def test_receive_options_fail_before_work(duration, size):
    from kvprof.receiver.run import parse_size, run_receive_command

    try:
        parse_size("--max-bytes", size)
    except UsageError:
        pass
    if math.isfinite(duration) and duration >= 0:
        return
    with pytest.raises(UsageError):
        run_receive_command(output=_tmpdir() / "r", grpc="off",
                            http="127.0.0.1:0", duration=duration)
