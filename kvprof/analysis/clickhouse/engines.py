"""Where the SQL runs: chDB in this process, or a ClickHouse server over its HTTP interface.

Both take one statement and give back a pyarrow Table (``FORMAT ArrowStream``), so the
caller cannot tell them apart. Failures become one-line kvprof errors: a server that cannot
be reached or does not answer in time is a ResourceAbsentError (exit 4), a missing
database or table, or credentials it refuses, a BadInputError (exit 3).
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvprof.errors import BadInputError, ResourceAbsentError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

SCHEME = "clickhouse://"
DEFAULT_PORT = 8123  # ClickHouse's HTTP interface
DEFAULT_TIMEOUT_S = 300.0
# ClickHouse error codes (src/Common/ErrorCodes.cpp) that say what went wrong.
UNKNOWN_TABLE, UNKNOWN_DATABASE, TIMEOUT_EXCEEDED = 60, 81, 159
AUTH_CODES = {192, 193, 194, 516}  # unknown user, wrong password, required password, auth failed
URL_HINT = ("Use clickhouse://[USER:PASSWORD@]HOST:PORT/DATABASE[?table=otel_traces&timeout=300]"
            " (PORT: the HTTP interface, 8123 by default).")


def _arrow(body: bytes) -> pa.Table:
    import pyarrow as pa

    if not body:  # an empty result has no stream at all on some servers
        return pa.table({})
    return pa.ipc.open_stream(body).read_all()


def error_code(text: str) -> int | None:
    """The ClickHouse error code in an exception text ("Code: 60. DB::Exception: ...")."""
    m = re.search(r"Code:\s*(\d+)", text)
    return int(m.group(1)) if m else None


def first_line(text: str) -> str:
    """An exception text cut to its first sentence-sized line (no stack trace)."""
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line[:300]


class ChdbEngine:
    """chDB (ClickHouse in this process): the embedded path over local files."""

    where = "chDB"

    def query(self, sql: str) -> pa.Table:
        try:
            import chdb
        except ImportError as exc:
            raise ResourceAbsentError(
                "chDB is not installed", hint="pip install chdb (kvprof's [sql] extra), "
                "or use --engine pandas.") from exc
        try:
            res = chdb.query(sql, "ArrowStream")
        except Exception as exc:  # chDB raises its own error type with ClickHouse's text
            raise SqlError(str(exc), error_code(str(exc))) from exc
        return _arrow(res.bytes())


class SqlError(Exception):
    """A statement the engine refused; ``code`` is ClickHouse's error code when known."""

    def __init__(self, text: str, code: int | None):
        super().__init__(text)
        self.code = code


@dataclass
class HttpEngine:
    """A ClickHouse server, spoken to over its HTTP interface (no client library needed)."""

    host: str
    port: int
    database: str
    table: str = "otel_traces"
    user: str | None = None
    password: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def where(self) -> str:
        return f"ClickHouse at {self.host}:{self.port}"

    @property
    def url_text(self) -> str:
        """The source as the report names it (never the password)."""
        return f"{SCHEME}{self.host}:{self.port}/{self.database}?table={self.table}"

    def query(self, sql: str) -> pa.Table:
        params = {"database": self.database, "default_format": "ArrowStream",
                  # The server stops the query itself; the socket waits a little longer.
                  "max_execution_time": str(int(max(1, self.timeout_s)))}
        url = f"http://{self.host}:{self.port}/?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=sql.encode(), method="POST")
        if self.user:
            req.add_header("X-ClickHouse-User", self.user)
            req.add_header("X-ClickHouse-Key", self.password or "")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s + 30) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            code = exc.headers.get("X-ClickHouse-Exception-Code")
            raise SqlError(text, int(code) if code and code.isdigit() else error_code(text)
                           ) from exc
        except TimeoutError as exc:
            raise SqlError(f"no answer within {self.timeout_s + 30:.0f} s",
                           TIMEOUT_EXCEEDED) from exc
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            if isinstance(why, TimeoutError):
                raise SqlError(f"no answer within {self.timeout_s + 30:.0f} s",
                               TIMEOUT_EXCEEDED) from exc
            raise ResourceAbsentError(
                f"cannot reach ClickHouse at {self.host}:{self.port}: {why}",
                hint="Check the host and the port of its HTTP interface (8123 by default; "
                "9000 is the native protocol, which kvprof does not speak), and that this "
                "machine may connect to it.") from exc
        return _arrow(body)


def parse_url(text: str) -> HttpEngine:
    """clickhouse://[USER:PASSWORD@]HOST[:PORT]/DATABASE[?table=NAME&timeout=SECONDS]."""
    u = urllib.parse.urlsplit(text)
    q = urllib.parse.parse_qs(u.query)
    try:
        port = u.port or DEFAULT_PORT
        timeout = float(q.get("timeout", [DEFAULT_TIMEOUT_S])[0])
    except ValueError as exc:
        raise BadInputError(f"{text}: {exc}", hint=URL_HINT) from exc
    database = u.path.strip("/")
    unknown = set(q) - {"table", "timeout"}
    if u.scheme != "clickhouse" or not u.hostname or not database or "/" in database or unknown:
        why = (f"unknown option(s) {', '.join(sorted(unknown))}" if unknown else
               "no database named" if not database or "/" in database else "no host")
        raise BadInputError(f"{text}: {why}", hint=URL_HINT)
    if timeout <= 0:
        raise BadInputError(f"{text}: timeout must be > 0 seconds", hint=URL_HINT)
    return HttpEngine(host=u.hostname, port=port, database=database,
                      table=q.get("table", ["otel_traces"])[0],
                      user=urllib.parse.unquote(u.username) if u.username else None,
                      password=urllib.parse.unquote(u.password) if u.password else None,
                      timeout_s=timeout)


def explain(err: SqlError, where: str, what: str) -> Exception:
    """The kvprof error for an engine's refusal of ``what`` (a table, or files)."""
    line = first_line(str(err))
    if err.code == TIMEOUT_EXCEEDED:
        return ResourceAbsentError(
            f"{where} did not finish reading {what} in time: {line}",
            hint="Narrow the window (--lookback 10m) or the traces (--service NAME), or allow "
            "longer with ?timeout=SECONDS in the clickhouse:// URL.")
    if err.code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
        return BadInputError(f"{where} has no {what}: {line}",
                             hint="Name the database (clickhouse://HOST:8123/DB) and, when "
                             "it is not otel_traces, the table (?table=NAME) the collector's "
                             "clickhouse exporter writes.")
    if err.code in AUTH_CODES:
        return BadInputError(f"{where} refused the credentials: {line}",
                             hint="Give them in the URL: clickhouse://USER:PASSWORD@HOST:8123/DB.")
    return BadInputError(f"{where} could not read {what}: {line}",
                         hint="The table must be the OpenTelemetry Collector ClickHouse "
                         "exporter's traces table (Map or JSON attributes).")
