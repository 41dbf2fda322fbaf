"""Where a rendered report goes and in which format: --format follows --out's suffix, and back."""

from __future__ import annotations

from pathlib import Path

from kvprof.errors import UsageError

SUFFIXES = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md", ".json": "json"}
ALIASES = {"markdown": "md", "htm": "html"}
PUBLIC_MODE = 0o644  # reports and results hold no secrets: readable like any file people share


def format_name(fmt: str, formats: tuple[str, ...]) -> str:
    """``fmt`` as one of ``formats`` (markdown -> md), or a usage error."""
    name = ALIASES.get(fmt.lower(), fmt.lower())
    if name not in formats:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(formats)}",
                         hint="Or leave --format out: the --out file's suffix chooses it.")
    return name


def resolve_output(out: Path | None, fmt: str | None, formats: tuple[str, ...],
                   default_fmt: str, default_out: Path | None) -> tuple[Path | None, str]:
    """(path, format) as people expect: the format from ``--out``'s suffix when ``--format``
    is not given, the default path's suffix from ``--format`` when ``--out`` is not given,
    and a usage error when both are given and disagree."""
    by_suffix = SUFFIXES.get(out.suffix.lower()) if out is not None else None
    if fmt is None:
        name = by_suffix if by_suffix in formats else default_fmt
    else:
        name = format_name(fmt, formats)
        if by_suffix is not None and by_suffix != name:
            raise UsageError(f"--out {out} ends in {out.suffix} but --format is {name}",
                             hint=f"Name the file .{name}, or leave --format out.")
    if out is None and default_out is not None:
        out = default_out.with_suffix("." + name)
    return out, name


def write_public(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a .tmp renamed over ``path``), mode 0644 whatever the umask
    or the temporary file's own mode."""
    from kvprof.outputs import atomic_write

    # The temp file is removed on any failure, a full disk included (issue 21).
    return atomic_write(path, text, mode=PUBLIC_MODE)
