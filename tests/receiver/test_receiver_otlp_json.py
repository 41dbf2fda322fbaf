"""kvprof.otlp_json: the fast span encoder equals protobuf's JSON mapping, and the probes' files."""

from __future__ import annotations

import base64
import json
import math

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from receiver_helpers import make_spans

from kvprof import otlp_json


def _reference(request: ExportTraceServiceRequest) -> dict:
    """protobuf's own JSON mapping with the ids turned into hex: what the probes always wrote."""
    doc = MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for obj in [sp, *sp.get("links", [])]:
                    for k in otlp_json.ID_FIELDS:
                        if obj.get(k):
                            obj[k] = base64.b64decode(obj[k]).hex()
    return doc


def _kv(key: str, **value) -> KeyValue:
    kv = KeyValue(key=key)
    if value:
        kv.value.CopyFrom(AnyValue(**value))
    return kv


def _every_field_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.21.0")
    rs.resource.attributes.append(_kv("service.name", string_value="dynamo-worker"))
    rs.resource.dropped_attributes_count = 2
    ss = rs.scope_spans.add(schema_url="s")
    ss.scope.name, ss.scope.version = "dynamo", "1.6.1"
    values = [
        _kv("s", string_value="x\u00e9\"\n"), _kv("b", bool_value=True),
        _kv("b0", bool_value=False), _kv("i", int_value=-(2**63)), _kv("i0", int_value=0),
        _kv("d", double_value=1.5), _kv("d0", double_value=0.0),
        _kv("nan", double_value=math.nan), _kv("inf", double_value=math.inf),
        _kv("ninf", double_value=-math.inf), _kv("bytes", bytes_value=b"\x00\xff"),
        _kv("empty"), _kv(""), _kv("unset", string_value=""),
    ]
    nested = _kv("arr")
    nested.value.array_value.values.add(int_value=7)
    nested.value.array_value.values.add(string_value="a")
    nested.value.array_value.values.add()  # an AnyValue with nothing set
    kvl = _kv("map")
    kvl.value.kvlist_value.values.append(_kv("inner", double_value=2.0))
    empty_arr = _kv("empty_arr")
    empty_arr.value.array_value.SetInParent()
    empty_map = _kv("empty_map")
    empty_map.value.kvlist_value.SetInParent()
    span = ss.spans.add(
        trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), trace_state="k=v",
        parent_span_id=bytes(range(9, 17)), flags=0x301, name="llm_request", kind=2,
        start_time_unix_nano=1_700_000_000_123_456_789, end_time_unix_nano=2**64 - 1,
        dropped_attributes_count=1, dropped_events_count=3, dropped_links_count=4,
    )
    span.attributes.extend([*values, nested, kvl, empty_arr, empty_map])
    if "key_strindex" in KeyValue.DESCRIPTOR.fields_by_name:  # opentelemetry-proto >= 1.9
        span.attributes.append(KeyValue(key_strindex=3, value=AnyValue(string_value_strindex=4)))
    ev = span.events.add(time_unix_nano=5, name="first_token", dropped_attributes_count=1)
    ev.attributes.append(_kv("n", int_value=1))
    span.events.add()  # all defaults
    link = span.links.add(trace_id=bytes(16), span_id=b"\x01" * 8, trace_state="a=b",
                          dropped_attributes_count=2, flags=1)
    link.attributes.append(_kv("l", string_value="v"))
    span.links.add()
    span.status.CopyFrom(Status(code=2, message="boom"))
    ss.spans.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8)  # no status at all
    s3 = ss.spans.add(trace_id=b"\x02" * 16, span_id=b"\x04" * 8)
    s3.status.SetInParent()  # present but empty: {}
    rs.scope_spans.add()  # a scope with no spans
    req.resource_spans.add()  # a resource with nothing
    return req


def test_fast_encoder_equals_protobuf_json_mapping():
    req = _every_field_request()
    assert otlp_json._fast_path_ok()
    assert otlp_json.request_to_json(req) == _reference(req)
    for sp in req.resource_spans[0].scope_spans[0].spans:
        assert otlp_json._span_json(sp) == otlp_json._span_json_generic(sp)
    # and byte for byte, key order included
    assert otlp_json.dumps_line(otlp_json.request_to_json(req)) == otlp_json.dumps_line(
        _reference(req))


def test_the_probes_file_exporter_writes_protobufs_own_mapping(tmp_path):
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from kvprof.probes.export import OtlpJsonFileExporter

    spans = make_spans(4, attrs_per_span=3)
    exporter = OtlpJsonFileExporter(tmp_path, "probe")
    exporter.export(spans)
    exporter.shutdown()
    (written,) = tmp_path.glob("probe-*.jsonl")
    assert written.read_bytes() == (json.dumps(_reference(encode_spans(spans)),
                                               separators=(",", ":")) + "\n").encode()


def test_json_round_trip_gives_the_same_request():
    req = _every_field_request()
    doc = json.loads(json.dumps(otlp_json.request_to_json(req)))
    back = otlp_json.json_to_request(doc)
    # NaN does not compare equal to itself; compare the encodings instead
    assert otlp_json.request_to_json(back) == otlp_json.request_to_json(req)


def test_json_accepts_proto_field_names_enum_names_and_numbers_for_int64():
    doc = {"resource_spans": [{"scope_spans": [{"spans": [{
        "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
        "name": "x", "kind": "SPAN_KIND_SERVER", "start_time_unix_nano": 5,
        "endTimeUnixNano": "6", "unknownField": {"ignored": True},
    }]}]}]}
    req = otlp_json.json_to_request(doc)
    sp = req.resource_spans[0].scope_spans[0].spans[0]
    assert sp.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert (sp.kind, sp.start_time_unix_nano, sp.end_time_unix_nano) == (2, 5, 6)


@pytest.mark.parametrize("doc,needle", [
    ([], "expected a JSON object"),
    ({"resourceSpans": {}}, "must be a list"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}, "is not hex"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": 7}]}]}]}, "hex string"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": ["x"]}]}]}]}, "name"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": ["x"]}]}]}, "expected a span object"),
])
def test_json_to_request_refuses_what_is_not_a_request(doc, needle):
    with pytest.raises(ValueError, match=needle):
        otlp_json.json_to_request(doc)


def test_large_request_splits_into_whole_requests():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    spans = make_spans(850)  # 2,550 spans
    req = encode_spans(spans)
    docs = list(otlp_json.iter_request_json(req, max_spans=1024))
    counts = [sum(len(ss["spans"]) for rs in d["resourceSpans"] for ss in rs["scopeSpans"])
              for d in docs]
    assert counts == [1024, 1024, 502]
    for d in docs:  # each line names its resource, so each stands alone
        res = d["resourceSpans"][0]["resource"]["attributes"]
        assert {"key": "service.name", "value": {"stringValue": "dynamo-frontend"}} in res
    whole = otlp_json.request_to_json(req)
    merged = [sp for d in docs for rs in d["resourceSpans"] for ss in rs["scopeSpans"]
              for sp in ss["spans"]]
    assert merged == whole["resourceSpans"][0]["scopeSpans"][0]["spans"]
