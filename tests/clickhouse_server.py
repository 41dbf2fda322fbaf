"""A ClickHouse for tests: chDB (the real ClickHouse engine, in-process) behind a small HTTP
server on 127.0.0.1 that speaks ClickHouse's HTTP interface (POST / with the SQL as body,
``database``/``default_format``/``max_execution_time`` parameters, errors as text with
``X-ClickHouse-Exception-Code``). Only the cluster is faked: every statement kvprof sends is
executed by ClickHouse's own engine. No ClickHouse server can run on this machine (none on
PyPI; chDB is the engine as a library).

It creates the OpenTelemetry Collector ClickHouse exporter's ``otel_traces`` table (the
exporter's DDL, Map or JSON attributes) and inserts OTLP/JSON trace files the way the
exporter does (exporter_traces.go / exporter_traces_json.go: one row per span, Timestamp =
start, Duration = end - start in ns, ServiceName from service.name, attribute values as
pcommon's AsString for Map, as json.Marshal(AsRaw()) for JSON, StatusCode's name), written
here independently of kvprof's own OTLP -> SQL reading.

Run: ``python tests/clickhouse_server.py --traces DIR [--variant map|json]``; it prints
``PORT <n>`` once serving and stops on SIGTERM or when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvprof.analysis.clickhouse.schema import JSON_DDL, MAP_DDL  # noqa: E402

KINDS = {0: "Unspecified", 1: "Internal", 2: "Server", 3: "Client", 4: "Producer",
         5: "Consumer"}
STATUS = {0: "Unset", 1: "Ok", 2: "Error"}


def _go_string(value: dict) -> str:
    """pcommon.Value.AsString of an OTLP JSON AnyValue."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return str(int(value["intValue"]))
    if "doubleValue" in value:
        f = float(value["doubleValue"])
        # strconv.FormatFloat(f, 'g', -1, 64) style: shortest repr, no trailing ".0".
        return repr(f).removesuffix(".0") if f == f and f not in (float("inf"), -float("inf")
                                                                 ) else str(f)
    if "boolValue" in value:
        return "true" if value["boolValue"] else "false"
    return json.dumps(_raw(value))


def _raw(value: dict):
    """pcommon.Value.AsRaw of an OTLP JSON AnyValue (what json.Marshal sees)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_raw(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return {kv["key"]: _raw(kv["value"]) for kv in value["kvlistValue"].get("values", [])}
    return None


def exporter_rows(paths: list[Path], variant: str):
    """One row per span, as the exporter appends it to its insert batch."""
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            for rs in doc.get("resourceSpans", []):
                res = rs.get("resource", {}).get("attributes", [])
                res_map = {a["key"]: _go_string(a["value"]) for a in res}
                res_json = json.dumps({a["key"]: _raw(a["value"]) for a in res})
                for ss in rs.get("scopeSpans", []):
                    scope = ss.get("scope", {})
                    for sp in ss.get("spans", []):
                        attrs = sp.get("attributes", [])
                        start, end = int(sp["startTimeUnixNano"]), int(sp["endTimeUnixNano"])
                        status = sp.get("status", {})
                        yield {
                            "ts": start, "TraceId": sp["traceId"], "SpanId": sp["spanId"],
                            "ParentSpanId": sp.get("parentSpanId", ""),
                            "TraceState": sp.get("traceState", ""), "SpanName": sp["name"],
                            "SpanKind": KINDS.get(int(sp.get("kind", 0)), "Unspecified"),
                            "ServiceName": res_map.get("service.name", ""),
                            "ResourceAttributes": res_map if variant == "map" else res_json,
                            "ScopeName": scope.get("name", ""),
                            "ScopeVersion": scope.get("version", ""),
                            "SpanAttributes": ({a["key"]: _go_string(a["value"]) for a in attrs}
                                               if variant == "map" else json.dumps(
                                                   {a["key"]: _raw(a["value"]) for a in attrs})),
                            "Duration": end - start,
                            "StatusCode": STATUS.get(int(status.get("code", 0)), "Unset"),
                            "StatusMessage": status.get("message", ""),
                        }


def create_and_insert(sess, db: str, table: str, paths: list[Path], variant: str,
                      scratch: Path) -> int:
    """The exporter's table, filled with the spans of ``paths``; returns the row count."""
    sess.query(f"CREATE DATABASE IF NOT EXISTS {db}")
    sess.query((MAP_DDL if variant == "map" else JSON_DDL).format(db=db, table=table))
    rows = scratch / f"{table}.jsonl"
    n = 0
    with rows.open("w") as fh:
        for row in exporter_rows(paths, variant):
            fh.write(json.dumps(row) + "\n")
            n += 1
    attr_t = "Map(String, String)" if variant == "map" else "String"
    cols = ("ts Int64, TraceId String, SpanId String, ParentSpanId String, TraceState String, "
            "SpanName String, SpanKind String, ServiceName String, "
            f"ResourceAttributes {attr_t}, ScopeName String, ScopeVersion String, "
            f"SpanAttributes {attr_t}, Duration UInt64, StatusCode String, "
            "StatusMessage String")
    sess.query(
        f"INSERT INTO {db}.{table} (Timestamp, TraceId, SpanId, ParentSpanId, TraceState, "
        "SpanName, SpanKind, ServiceName, ResourceAttributes, ScopeName, ScopeVersion, "
        "SpanAttributes, Duration, StatusCode, StatusMessage) SELECT "
        "fromUnixTimestamp64Nano(ts), TraceId, SpanId, ParentSpanId, TraceState, SpanName, "
        "SpanKind, ServiceName, ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, "
        f"Duration, StatusCode, StatusMessage FROM file('{rows}', 'JSONEachRow', '{cols}')")
    rows.unlink()
    return n


def create_and_insert_sql(sess, db: str, table: str, paths: list[Path]) -> int:
    """The exporter's table (Map variant) filled by chDB itself from the files: for the
    benchmark's million spans, where the per-span Python of ``create_and_insert`` is slow.
    Uses kvprof's own OTLP -> exporter-columns reading, so tests use the other one."""
    from kvprof.analysis.clickhouse.query import otlp_files_relation

    sess.query(f"CREATE DATABASE IF NOT EXISTS {db}")
    sess.query(MAP_DDL.format(db=db, table=table))
    for p in paths:
        sess.query(
            f"INSERT INTO {db}.{table} (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, "
            "ServiceName, ResourceAttributes, SpanAttributes, Duration, StatusCode, "
            "StatusMessage) SELECT Timestamp, TraceId, SpanId, ParentSpanId, SpanName, "
            "ResourceAttributes['service.name'], ResourceAttributes, SpanAttributes, Duration, "
            "multiIf(StatusCode = '1', 'Ok', StatusCode = '2', 'Error', 'Unset'), StatusMessage "
            f"FROM {otlp_files_relation(str(p.resolve()))} "
            "SETTINGS input_format_skip_unknown_fields = 1")
    return int(sess.query(f"SELECT count() FROM {db}.{table}", "CSV").bytes().strip())


def add_bad_tables(sess, db: str) -> None:
    """``other``: a table of another schema; ``endless``: the exporter's column types over an
    endless row source, so any read of it runs until max_execution_time stops it."""
    sess.query(f"CREATE TABLE IF NOT EXISTS {db}.other (ts DateTime, msg String) "
               "ENGINE = MergeTree ORDER BY ts")
    sess.query(
        f"CREATE VIEW IF NOT EXISTS {db}.endless AS SELECT toDateTime64(number, 9) AS Timestamp, "
        "hex(number) AS TraceId, hex(number) AS SpanId, '' AS ParentSpanId, "
        "toLowCardinality('x') AS SpanName, toLowCardinality('') AS ServiceName, "
        "CAST(map(), 'Map(LowCardinality(String), String)') AS ResourceAttributes, "
        "CAST(map(), 'Map(LowCardinality(String), String)') AS SpanAttributes, "
        "toUInt64(1) AS Duration, toLowCardinality('Unset') AS StatusCode, "
        "'' AS StatusMessage FROM system.numbers")


class _Handler(BaseHTTPRequestHandler):
    sess = None
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        sql = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        fmt = q.get("default_format", "TabSeparated")
        try:
            with self.lock:  # one chDB session: one statement at a time
                if "database" in q:
                    self.sess.query(f"USE `{q['database']}`")
                settings = {k: v for k, v in q.items()
                            if k in ("max_execution_time",) and re.fullmatch(r"[0-9.]+", v)}
                # As the server applies URL settings: beside the statement's own SETTINGS.
                given = ", ".join(f"{k} = {v}" for k, v in settings.items())
                suffix = ("" if not settings else f", {given}" if " SETTINGS " in sql
                          else f" SETTINGS {given}")
                body = self.sess.query(sql + suffix, fmt).bytes()
        except Exception as exc:  # the engine's refusal, as ClickHouse's HTTP interface sends it
            text = str(exc)
            m = re.search(r"Code:\s*(\d+)", text)
            self.send_response(404 if m and m.group(1) in ("60", "81") else 500)
            if m:
                self.send_header("X-ClickHouse-Exception-Code", m.group(1))
            self.send_header("Content-Type", "text/plain; charset=UTF-8")
            self.end_headers()
            self.wfile.write(text.encode())
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=Path, required=True)
    ap.add_argument("--variant", choices=("map", "json"), default="map")
    ap.add_argument("--db", default="otel")
    ap.add_argument("--sql-insert", action="store_true",
                    help="insert with chDB's own JSON reading (fast; for benchmarks)")
    args = ap.parse_args()
    import signal

    from chdb import session

    from kvprof.analysis.loaders.traces import trace_files

    # SIGTERM unwinds like the end of stdin: the temporary database is removed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    with tempfile.TemporaryDirectory(prefix="kvprof-ch-") as tmp:
        sess = session.Session(str(Path(tmp) / "db"))
        paths = trace_files(args.traces) if args.traces.is_dir() else [args.traces]
        n = (create_and_insert_sql(sess, args.db, "otel_traces", paths) if args.sql_insert
             else create_and_insert(sess, args.db, "otel_traces", paths, args.variant, Path(tmp)))
        add_bad_tables(sess, args.db)
        _Handler.sess = sess
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"PORT {server.server_address[1]} ROWS {n}", flush=True)
        try:
            sys.stdin.read()  # until the test closes our stdin (or stops us)
        finally:
            server.shutdown()
            sess.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
