"""Outputs that succeed or say so: destination checks before work, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from kvprof.errors import EXIT_FAILED, KvprofError, UsageError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path("/")


def _dest_problem(path: Path, want: str) -> str | None:
    """Why nothing can be written at `path` (a file, or a folder when want="dir"), or None."""
    if os.path.lexists(path):
        try:
            is_dir = path.is_dir()
        except OSError as exc:
            return f"cannot be used ({exc.strerror})"
        if want == "file" and is_dir:
            return "is a directory; give a file name"
        if want == "dir" and not is_dir:
            return "is a file, not a folder"
        if want == "file" and not path.is_file():
            return "exists and is not a regular file"
        base = path if is_dir else path.parent
    else:
        anc = _first_existing(path.parent)
        try:
            if not anc.is_dir():
                return f"cannot be created: {anc} is a file, not a folder"
        except OSError as exc:
            return f"cannot be created ({exc.strerror})"
        base = anc
    try:
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            return f"is on a read-only filesystem ({base})"
    except OSError:
        pass
    if not os.access(base, os.W_OK | os.X_OK):
        return f"is not writable (no write permission on {base})"
    return None


def check_output(path: str | Path, option: str, want: str = "file") -> Path:
    """Fail before any work when `path` cannot be written (exit 2 with the true reason)."""
    p = Path(path)
    why = _dest_problem(p, want)
    if why:
        raise UsageError(f"{option} {p} {why}",
                         hint=f"Choose another {option} (a writable "
                         f"{'folder' if want == 'dir' else 'file path'}).")
    return p


def make_dir(path: str | Path, option: str) -> Path:
    """mkdir -p with a KvprofError instead of an OSError."""
    p = check_output(path, option, want="dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(p, exc) from None
    return p


def write_error(path: Path, exc: OSError) -> KvprofError:
    """The KvprofError for a failed write (full disk named as such)."""
    if exc.errno in _FULL:
        return KvprofError(f"could not write {path}: {exc.strerror} (disk full or file size "
                           "limit); nothing was left behind",
                           hint="Free space on that filesystem (df -h) or write elsewhere.",
                           exit_code=EXIT_FAILED)
    return KvprofError(f"could not write {path}: {exc.strerror}",
                       hint="Check the path and its permissions, or write elsewhere.",
                       exit_code=EXIT_FAILED)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes, option: str = "--out",
                 mode: int | None = None) -> Path:
    """Write `data` to `path` via a temp file in the same folder; on any failure (full disk
    included) the temp file is removed, the old `path` is untouched and a KvprofError says why."""
    p = Path(path)
    check_output(p, option)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(p, exc) from None
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; kvprof's outputs hold no secrets, so they get what a plain
        # open() would give (0644 under the usual umask) unless the caller says otherwise.
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise write_error(p, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return p
