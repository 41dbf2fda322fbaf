"""The input boundary: true messages for odd paths, bounded JSON nesting, finite numbers."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from kvprof.errors import BadInputError, UsageError

# OTLP, Jaeger, aiperf, kubectl and HF config documents nest about 12 levels deep; parsers
# recurse (json: RecursionError) or crash (Arrow's JSON reader: SIGSEGV) far beyond that.
MAX_JSON_DEPTH = 200

_STDIN_NAMES = {"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"}


def path_problem(path: str | Path, want: str = "file") -> str | None:
    """Why `path` cannot be read as a regular file (want="file") or a folder ("dir"), or None.

    The message says what the path really is: a named pipe, a socket, standard input, a
    symbolic-link loop, a file where a folder was expected (or the reverse), a path under a file.
    """
    text = str(path)
    if text in _STDIN_NAMES:
        return "standard input is not supported: save the data to a file and pass its path"
    try:
        st = os.stat(text)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic-link loop (the links point at each other)"
        if exc.errno == errno.ENOTDIR:
            under = _file_above(Path(text))
            return (f"cannot exist: {under} is a file, not a folder" if under
                    else "a part of the path is not a folder")
        if exc.errno == errno.ENOENT:
            return "not found"
        if exc.errno == errno.EACCES:
            return "permission denied"
        if exc.errno == errno.ENAMETOOLONG:
            return "the name is too long"
        return f"cannot be read ({exc.strerror})"
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return ("is a named pipe (FIFO), not a regular file: kvprof reads files whole and a "
                "pipe could block forever")
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if want == "any":
        return None
    if want == "file" and stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if want == "dir" and not stat.S_ISDIR(mode):
        return "is a file, not a folder"
    return None


def _file_above(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_input(path: str | Path, what: str, want: str = "file", hint: str | None = None) -> Path:
    """`path` as a Path if it is a readable regular file (or folder); else a BadInputError."""
    why = path_problem(path, want)
    if why:
        raise BadInputError(f"{what} {path} {why}" if not why.startswith(("standard", "cannot"))
                            else f"{what} {path}: {why}",
                            hint=hint or f"Pass a {'folder' if want == 'dir' else 'regular file'}"
                            f" for the {what}.")
    return Path(path)


def json_depth(data: bytes | str) -> int:
    """The deepest bracket nesting of JSON text (strings' brackets excluded), without recursion.

    A quick count over all bytes first (brackets in strings can only raise it); the exact,
    string-aware count runs only when the quick one passes MAX_JSON_DEPTH.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    import numpy as np

    level, quick = 0, 0
    for i in range(0, len(data), _CHUNK):
        # Only the brackets move the count: dropping every other byte first (bytes.translate,
        # C speed) leaves ~4% of an OTLP file for NumPy; over every byte it was the loader's
        # largest step (issue 24: 5 CPU-s of 15 on the bench's 506 MB).
        brackets = data[i:i + _CHUNK].translate(None, _NOT_BRACKETS)
        depth = np.cumsum(_DELTA[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int32)
        if len(depth):
            quick = max(quick, level + int(depth.max()))
            level += int(depth[-1])
    if quick <= MAX_JSON_DEPTH:
        return quick
    return _exact_depth(data)


def _delta_table():
    import numpy as np

    t = np.zeros(256, dtype=np.int8)
    t[[0x5B, 0x7B]] = 1
    t[[0x5D, 0x7D]] = -1
    return t


_CHUNK = 1 << 26
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class _LazyDelta:
    """The byte -> nesting-step table, built on first use (numpy stays out of `--help`)."""

    table = None

    def __getitem__(self, idx):
        if self.table is None:
            self.table = _delta_table()
        return self.table[idx]


_DELTA = _LazyDelta()


def _exact_depth(data: bytes) -> int:
    """The exact nesting, skipping strings; lines of JSON-lines text are independent."""
    import re

    import numpy as np

    best = 0
    for line in data.splitlines():
        bare = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', line)
        arr = np.frombuffer(bare, dtype=np.uint8)
        delta = ((arr == 0x5B) | (arr == 0x7B)).astype(np.int32) - (
            (arr == 0x5D) | (arr == 0x7D)).astype(np.int32)
        if len(delta):
            best = max(best, int(np.cumsum(delta).max()))
    return best


def nesting_problem(path: Path) -> str | None:
    """A message when a JSON(-lines) file nests deeper than any kvprof input does, else None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None  # the reader reports it with its own words
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        return (f"JSON nested {depth} levels deep (more than {MAX_JSON_DEPTH}); not a "
                "file kvprof reads")
    return None


def load_json_file(path: str | Path, what: str, expected: str) -> Any:
    """One JSON document from a regular file, checked for encoding and nesting first."""
    p = check_input(path, what)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {what} {p}: {exc.strerror}",
                            hint=f"Expected {expected}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadInputError(f"{what} {p} is not UTF-8 text (line {line}, byte {exc.start})",
                            hint=f"Save it as UTF-8; expected {expected}.") from None
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise BadInputError(f"{what} {p} nests {depth} levels deep (more than "
                            f"{MAX_JSON_DEPTH})", hint=f"Expected {expected}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} {p} is not JSON (not valid JSON at line {exc.lineno}: "
                            f"{exc.msg})",
                            hint=f"Expected {expected}.") from None
    except RecursionError:
        raise BadInputError(f"{what} {p} nests too deeply", hint=f"Expected {expected}.") from None


def finite_number(value: Any, where: str, *, minimum: float | None = 0.0,
                  maximum: float | None = None, strict: bool = False) -> float:
    """`value` as a finite float in range; a BadInputError naming `where` otherwise.

    `strict` excludes the minimum itself (a duration or size must be above zero).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadInputError(f"{where} is {_show(value)}, expected a number",
                            hint="Check that the file was written by the tool that names it.")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise BadInputError(f"{where} is {_show(value)}, expected a number",
                            hint="Check that the file was written by the tool that names it."
                            ) from None
    problem = _range_problem(x, minimum, maximum, strict)
    if problem:
        raise BadInputError(f"{where} is {_show(value)}: {problem}",
                            hint="Check that the file was written by the tool that names it.")
    return x


def _range_problem(x: float, minimum: float | None, maximum: float | None,
                   strict: bool) -> str | None:
    if math.isnan(x):
        return "not a number"
    if math.isinf(x):
        return "infinite"
    if minimum is not None and (x < minimum or (strict and x == minimum)):
        return f"must be {'above' if strict else 'at least'} {minimum:g}"
    if maximum is not None and x > maximum:
        return f"must be at most {maximum:g}"
    return None


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def option_number(value: float | int | None, option: str, *, minimum: float | None = 0.0,
                  maximum: float | None = None, strict: bool = True) -> None:
    """Reject a numeric command-line option that is nan, infinite or out of range (exit 2)."""
    if value is None:
        return
    problem = _range_problem(float(value), minimum, maximum, strict)
    if problem:
        raise UsageError(f"{option} {value}: {problem}",
                         hint=f"Give {option} a finite number"
                         + (f" above {minimum:g}" if strict and minimum is not None else
                            f" of at least {minimum:g}" if minimum is not None else "")
                         + (f" and at most {maximum:g}" if maximum is not None else "") + ".")
