"""The breakdown of more spans than fit in memory: streamed through shards of requests.

A request's spans sit in one trace, or in a few joined by request ids (kvprof.analysis.keys),
and its breakdown reads only those; only the clock-skew estimate pools every request, and it
reads only the constraint table (a few numbers per request). So the trace files are read in
chunks of JSON lines (pyarrow), each chunk flattened to span rows and written to a scratch
folder with its (trace, id) links; the links' connected components, the requests, are dealt
to shards; each shard is loaded alone and runs the first half of the breakdown
(breakdown.breakdown_part); the constraints of all shards give one skew estimate; each shard
is then finished on it (breakdown.finish_breakdown) and the request tables are joined. Peak
memory is a shard's spans plus the request table, whatever the number of spans.

The result equals build_breakdown's on the same spans (tests/analysis/test_stream.py),
with one exception: the aiperf time-window fallback (records without an X-Request-Id in
common with the traces) matches within each shard, so one record can be claimed by a
request in two shards. The report sections that read every span (causes, CPU waits, link
counters, capacity, the what-if model) are left out of a streamed report, with a note.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from kvprof.analysis.breakdown import RequestBreakdown
    from kvprof.analysis.loaders.traces import SpanLoad

log = logging.getLogger(__name__)

# `kvprof report --stream auto` streams when the trace files pass this size (~2.4M spans of
# the probes' OTLP JSON lines; the in-memory path needs ~1.4 GB per million spans).
STREAM_BYTES = 1 << 30
# Target JSON bytes per shard (~300k spans: ~0.6 GB for a worker) and per chunk read.
SHARD_BYTES = 128 << 20
CHUNK_BYTES = 64 << 20
# The columns whose values join traces into requests (kvprof.analysis.keys).
LINK_COLUMNS = ("x_request_id", "request_id", "remote_request_id", "foreign_request_id")
ROW = "__kvprof_row"  # a part file's rows' place in the read order (chunk << 32 | row)
_HEX_VALUE = np.zeros(256, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
LEFT_OUT = ("Streamed analysis (the traces hold {spans:,} spans in {shards} shards): the "
            "sections that read every span at once (causes, CPU waits, link counters, "
            "capacity, the what-if model) are left out; run `kvprof report --stream off` on "
            "a part of the traces for them.")


@dataclass
class _Chunk:
    """What reading one chunk of a trace file gave."""

    index: int
    file: int
    rows: int = 0
    failed: str | None = None  # why the Arrow path could not take it (the file goes stdlib)
    problems: Any = None
    links: Any = None  # DataFrame (trace, link)
    traces: Any = None  # the chunk's distinct trace ids
    names: set = field(default_factory=set)
    first_ns: int | None = None  # earliest start among spans the breakdown reads


def trace_bytes(paths: list[Path]) -> int:
    """The total size of the trace files (what --stream auto decides on)."""
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            continue
    return total


def _chunk_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """(offset, length) of ~size-byte pieces of a JSON-lines file, cut after a newline."""
    total = path.stat().st_size
    out, pos = [], 0
    with path.open("rb") as fh:
        while pos < total:
            fh.seek(min(pos + size, total))
            if pos + size < total:
                fh.readline()
            end = min(fh.tell(), total)
            out.append((pos, end - pos))
            pos = end
    return out


def routing_links(frame: pd.DataFrame) -> pd.DataFrame:
    """(trace, link) pairs: every id that may join a trace to another (a superset of the
    graph keys.assign_request_keys builds: an extra link only puts two requests in one
    shard, never one request in two)."""
    import pandas as pd

    from kvprof.analysis.keys import client_request_id

    parts = []
    trace = frame["trace_id"].astype(object)
    for col in LINK_COLUMNS:
        if col not in frame:
            continue
        values = frame[col]
        if col in ("request_id", "remote_request_id"):
            values = client_request_id(values)
        values = values.astype(object)
        ok = values.notna().to_numpy()
        if col == "x_request_id":
            ok = ok & (values != "").to_numpy()
        if ok.any():
            parts.append(pd.DataFrame({"trace": trace[ok].to_numpy(),
                                       "link": values[ok].astype(str).to_numpy()}))
    if not parts:
        return pd.DataFrame({"trace": [], "link": []}, dtype=object)
    return pd.concat(parts, ignore_index=True).drop_duplicates(ignore_index=True)


def _read_chunk(job) -> _Chunk:
    """Parse one chunk with Arrow, flatten it, write its rows; the links and names back."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    from kvprof.analysis.loaders.otlp import SpanProblems
    from kvprof.analysis.loaders.otlp_arrow import flatten_otlp
    from kvprof.inputs import MAX_JSON_DEPTH, json_depth

    index, file_index, path, offset, length, work, shards = job
    chunk = _Chunk(index=index, file=file_index)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    if json_depth(data) > MAX_JSON_DEPTH:  # Arrow crashes on such nesting
        chunk.failed = "deep"
        return chunk
    problems = SpanProblems()
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(
            block_size=max(len(data) + 1, 1 << 20)))
        del data
        flat = flatten_otlp(table, Path(path).name, problems)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError,
            AttributeError, TypeError, IndexError, OSError) as exc:
        chunk.failed = f"arrow: {exc}"
        return chunk
    if flat is None:
        chunk.failed = "not OTLP for Arrow"
        return chunk
    chunk.rows, chunk.problems = flat.num_rows, problems
    cols = ["trace_id", *(c for c in LINK_COLUMNS if c in flat.column_names)]
    # A trace's dozen spans carry the same few ids: links from the distinct combinations.
    chunk.links = routing_links(flat.select(cols).group_by(cols).aggregate([]).to_pandas())
    chunk.traces = pc.unique(flat["trace_id"]).to_numpy(zero_copy_only=False)
    chunk.names = {str(n) for n in pc.unique(flat["name"]).to_pylist() if n is not None}
    from kvprof.analysis.breakdown import KNOWN_NAMES

    known = pc.is_in(flat["name"], value_set=pa.array(sorted(KNOWN_NAMES), pa.string()))
    chunk.first_ns = pc.min(pc.filter(flat["start_ns"], known)).as_py()
    # Rows go to their trace's shard now; the few traces whose request is homed in another
    # shard move later. ROW keeps the read order (chunks in file order) for the shard.
    flat = flat.append_column(ROW, pa.array(
        (np.int64(index) << np.int64(32)) + np.arange(flat.num_rows, dtype=np.int64)))
    _write_by_shard(flat, trace_shards(flat["trace_id"], shards), work, f"{index:06d}")
    return chunk


def _write_by_shard(table, shard: np.ndarray, work: Path, name: str, sub: str = "shard"
                    ) -> None:
    """Each shard's rows of a table (in order) to work/<sub>NNNN/<name>.arrow."""
    import pyarrow as pa

    order = np.argsort(shard, kind="stable")
    sorted_shard = shard[order]
    for s in np.unique(sorted_shard):
        lo, hi = np.searchsorted(sorted_shard, [s, s + 1])
        part = table.take(pa.array(order[lo:hi]))
        folder = work / f"{sub}{s:04d}"
        folder.mkdir(exist_ok=True)
        with pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, part.schema) as writer:
            writer.write_table(part)


def trace_shards(trace_ids, shards: int) -> np.ndarray:
    """A trace's home shard: its id's last 8 hex digits modulo ``shards`` (ids are 32
    lowercase hex digits by then: the loader checked or normalised them)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.chunked_array([trace_ids]) if not isinstance(trace_ids, pa.ChunkedArray) \
        else trace_ids
    ids = pc.cast(ids.combine_chunks(), pa.string())
    bufs = ids.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[ids.offset: ids.offset + len(ids) + 1]
    body = (np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None
            else np.zeros(1, dtype=np.uint8))
    ends = offsets[1:].astype(np.int64)
    at = np.clip(ends[:, None] - np.arange(8, 0, -1), 0, max(len(body) - 1, 0))
    nibble = _HEX_VALUE[body[at]].astype(np.uint64)
    value = (nibble << (np.uint64(4) * np.arange(7, -1, -1, dtype=np.uint64))).sum(axis=1)
    return (value % np.uint64(shards)).astype(np.int64)


def _shard_of_traces(traces: list, links: list, shards: int
                     ) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per trace id and per link: the shard of its request (connected component of the
    trace-link graph): the home shard of the component's first trace. Also the traces that
    must move (trace id -> shard) from their own home shard to it."""
    import pandas as pd
    import pyarrow as pa

    from kvprof.analysis.keys import _components

    all_links = (pd.concat(links, ignore_index=True) if links
                 else pd.DataFrame({"trace": [], "link": []}, dtype=object))
    trace_uni = pd.unique(np.concatenate(
        [np.asarray(t, dtype=object) for t in traces] + [all_links["trace"].to_numpy()]))
    index = pd.Index(trace_uni)
    t_codes = index.get_indexer(all_links["trace"].to_numpy())
    l_codes, l_uni = pd.factorize(all_links["link"].to_numpy())
    label = (_components(len(index), t_codes, l_codes, len(l_uni)) if len(l_uni)
             else np.arange(len(index)))
    own = trace_shards(pa.array(np.asarray(trace_uni, dtype=object), pa.string()), shards)
    shard = own[label]  # label: the component's first trace
    link_shard = np.zeros(len(l_uni), dtype=np.int64)
    link_shard[l_codes] = shard[t_codes]  # one component: one shard
    moved = shard != own
    return (pd.Series(shard, index=index), pd.Series(link_shard, index=pd.Index(l_uni)),
            pd.Series(shard[moved], index=index[moved]))


def _move(job) -> None:
    """The rows of traces homed in another shard, out of one part file, to work/moveNNNN/."""
    import pyarrow as pa

    path, moved, work = job
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    pos = moved.index.get_indexer(table["trace_id"].to_numpy(zero_copy_only=False))
    if not (pos >= 0).any():
        return
    rows = table.filter(pa.array(pos >= 0))
    _write_by_shard(rows, moved.to_numpy()[pos[pos >= 0]], work,
                    f"{path.parent.name}-{path.stem}", sub="move")


def merge_notes(per_shard: list[list[str]]) -> list[str]:
    """One list of notes from the shards': equal notes once; notes that differ only in
    their whole numbers (counts of requests) once, with the numbers summed."""
    groups: dict[str, list[str]] = {}
    for notes in per_shard:
        for note in notes:
            groups.setdefault(re.sub(r"\d+", "#", note), []).append(note)
    out = []
    for template, notes in groups.items():
        if len(set(notes)) == 1:
            out.append(notes[0])
            continue
        numbers = [[int(x) for x in re.findall(r"\d+", n)] for n in notes]
        sums = [str(sum(col)) for col in zip(*numbers, strict=True)]
        pieces = template.split("#")
        out.append(pieces[0] + "".join(n + rest for n, rest in zip(sums, pieces[1:],
                                                                     strict=True)))
    return out


def merge_hops(per_shard: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """The propagation table over all shards (its counts are per request: they add up) and
    its notes, worded as hop_table words them."""
    from kvprof.analysis.propagation import HOPS, _hop_notes, _words

    rows: dict[str, dict] = {}
    for hops in per_shard:
        for row in hops:
            have = rows.get(row["hop"])
            if have is None:
                rows[row["hop"]] = dict(row)
                continue
            for k, v in row.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    have[k] = (have[k] or 0) + v
    notes = []
    for row in rows.values():
        found = [(hop, label) for hop in HOPS for label in ("router", "Dynamo frontend")
                 if row["hop"] == f"{_words(hop.upstream, label)} -> "
                 f"{_words(hop.downstream, label)}"]
        if found:  # (the client hop has no notes)
            notes.extend(_hop_notes(row, *found[0]))
    return list(rows.values()), notes


@dataclass
class StreamResult:
    """The streamed breakdown and what the span loader would have said about the files."""

    breakdown: RequestBreakdown
    load: SpanLoad
    spans: int
    shards: int
    names: set = field(default_factory=set)
    # The aiperf records used (loaded here when given a loader): how many, and the loader's
    # notes; the frame itself is let go once the shards have their records.
    aiperf_records: int | None = None
    aiperf_notes: list = field(default_factory=list)


def stream_breakdown(source: str | Path, aiperf: pd.DataFrame | None = None,
                     client_host: str | None = None, one_clock: bool = False,
                     dynamo_records: pd.DataFrame | None = None, shards: int | None = None,
                     chunk_bytes: int = CHUNK_BYTES, workdir: str | Path | None = None,
                     skip_files: set | None = None, workers: int | None = None
                     ) -> StreamResult:
    """build_breakdown over load_spans(source), in bounded memory (module docstring).

    ``shards``: how many shards of requests (default: one per SHARD_BYTES of trace files);
    ``skip_files``: files of the folder not to read as spans (Dynamo's request_end records);
    ``aiperf``: the records, or a function that loads them: it then runs beside the trace
    reading (it is Python-bound, Arrow's parsing is not) and its frame is in the result;
    ``workers``: processes that break shards down at once (default: 2 on 2+ cores when the
    files pass SHARD_BYTES, else 1, in this process): pandas holds the GIL, and each
    worker holds one shard.
    """
    import pandas as pd
    import pyarrow as pa

    from kvprof.analysis.breakdown import (
        KNOWN_NAMES,
        RequestBreakdown,
        leg_order,
        mark_first_contact,
    )
    from kvprof.analysis.loaders.otlp import SpanProblems
    from kvprof.analysis.loaders.traces import (
        EXPECTED,
        SpanLoad,
        _Columns,
        _file_verdict,
        _load_file,
        _readable,
        _span_notes,
        no_spans_error,
        trace_files,
    )
    from kvprof.analysis.skew import estimate_skew
    from kvprof.errors import BadInputError
    from kvprof.inputs import nesting_problem, path_problem

    path = Path(source)
    why_path = path_problem(path, "any")
    if why_path:
        raise BadInputError(f"trace path {path}: {why_path}",
                            hint="Pass a trace file or a directory of *.jsonl/*.json.")
    paths = [p for p in (trace_files(path) if path.is_dir() else [path])
             if str(p) not in (skip_files or set())]
    if not paths:
        raise BadInputError(f"no trace files (*.json, *.jsonl) in {path}",
                            hint="Point --traces at the probes' output directory.")
    shards = shards or max(1, -(-trace_bytes(paths) // SHARD_BYTES))
    work = Path(tempfile.mkdtemp(prefix="kvprof-stream-", dir=workdir))
    try:
        jobs = []
        for f, p in enumerate(paths):
            if _readable(p):
                for off, length in _chunk_ranges(p, chunk_bytes):
                    jobs.append((len(jobs), f, str(p), off, length, work, shards))
        log.info("streaming %d trace file(s) in %d chunk(s) into %d shard(s)", len(paths),
                 len(jobs), shards)
        pending = None
        if callable(aiperf):
            from concurrent.futures import ThreadPoolExecutor

            side = ThreadPoolExecutor(max_workers=1)
            pending = side.submit(aiperf)
            side.shutdown(wait=False)
        chunks = _run(_read_chunk, jobs)
        if pending is not None:
            aiperf = pending.result()
        by_file: dict[int, list[_Chunk]] = {}
        for c in chunks:
            by_file.setdefault(c.file, []).append(c)
        # Files Arrow could not take whole go the stdlib way, as load_spans sends them.
        stdlib: list[tuple[int, pd.DataFrame]] = []
        per_file: list[tuple[str, Any]] = []
        skipped: list[tuple[str, str]] = []
        deep_files: list[tuple[str, str]] = []  # listed first, as load_spans lists them
        files: list[str] = []
        formats: set[str] = set()
        names: set[str] = set()
        traces, links, firsts = [], [], []
        for f, p in enumerate(paths):
            got = by_file.get(f)
            if got and any(c.failed == "deep" for c in got):
                deep_files.append((str(p), nesting_problem(p) or "JSON nested too deeply"))
                _drop_parts(work, got)
                continue
            if got and not any(c.failed for c in got):
                problems = SpanProblems()
                for c in got:
                    problems.merge(c.problems)
                read = sum(c.rows for c in got)
                why: list[str] = []  # the file itself read fine
                if read:
                    formats.add("otlp")
                    names |= set().union(*(c.names for c in got))
                    traces += [c.traces for c in got]
                    links += [c.links for c in got]
                    firsts += [c.first_ns for c in got if c.first_ns is not None]
            else:
                _drop_parts(work, got or [])
                if not got:
                    deep = nesting_problem(p)
                    if deep:
                        deep_files.append((str(p), deep))
                        continue
                cols, problems = _Columns(), SpanProblems()
                why = _load_file(p, cols, formats, problems)
                read = len(cols)
                if read:
                    frame = cols.frame()
                    stdlib.append((f, frame))
                    names |= {str(n) for n in pd.unique(frame["name"])}
                    traces.append(frame["trace_id"].unique())
                    links.append(routing_links(frame))
                    known = frame["start_ns"][frame["name"].isin(KNOWN_NAMES)]
                    firsts += [int(known.min())] if len(known) else []
            per_file.append((str(p), problems))
            verdict = _file_verdict(why, problems, read)
            if verdict:
                skipped.append((str(p), verdict))
            if read:
                files.append(str(p))
        skipped = deep_files + skipped
        if not traces:
            raise no_spans_error(path, skipped, per_file)
        shard_of, link_shard, moved = _shard_of_traces(traces, links, shards)
        del traces, links
        for c in chunks:
            c.links = c.traces = None
        if len(moved):
            log.info("%d trace(s) join a request homed in another shard", len(moved))
            _run(_move, [(p, moved, work) for p in sorted(work.glob("shard*/*.arrow"))])
        rec_shard = None
        if aiperf is not None and len(aiperf) and "x_request_id" in aiperf:
            # A record goes to the shard of the request whose id it names; a record naming
            # no traced id goes to every shard (the time-window fallback's candidates).
            pos = link_shard.index.get_indexer(aiperf["x_request_id"].astype(str).to_numpy())
            rec_shard = np.where(pos >= 0, np.r_[link_shard.to_numpy(), -1][pos], -1)
        del link_shard
        stdlib_frames = [(f, frame, shard_of.to_numpy()[shard_of.index.get_indexer(
            frame["trace_id"].to_numpy())]) for f, frame in stdlib]
        del shard_of
        moved = pa.array(moved.index.to_numpy(), pa.string()) if len(moved) else None
        base = min(firsts) if firsts else None
        aiperf_records = None if aiperf is None else int(len(aiperf))
        aiperf_notes = [] if aiperf is None else list(aiperf.attrs.get("notes", []))

        def jobs1():  # one shard's records at a time, not a copy of them all
            for s in range(shards):
                yield (work, s, moved, [frame[where == s] for _f, frame, where in stdlib_frames],
                       aiperf if rec_shard is None or aiperf is None
                       else aiperf[(rec_shard == s) | (rec_shard < 0)],
                       client_host, one_clock, dynamo_records, base)
        workers = workers or (min(2, os.cpu_count() or 1) if shards > 1 and trace_bytes(
            paths) > SHARD_BYTES else 1)
        _give_back_memory()  # before forking: the workers start from this process
        with _pool(workers) as pool:
            firsts_done = list(_bounded_map(pool, _first_half, jobs1(), workers))
            stdlib_frames = aiperf = rec_shard = None  # their memory back before the rest
            cons, refs, n_spans, dup_notes, parts = [], [], 0, [], []
            for got in firsts_done:
                if got is None:
                    continue
                n, dup, con, ref, file = got
                n_spans += n
                if dup:
                    dup_notes.append([dup])
                if file is not None:
                    cons.append(con)
                    refs += [ref] if ref is not None else []
                    parts.append(file)
            del firsts_done
            if not parts:
                raise BadInputError(f"{path}: no span that kvprof's analysis reads",
                                    hint=f"Expected {EXPECTED}.")
            constraints = pd.concat(cons, ignore_index=True)
            del cons
            skew = estimate_skew(constraints, min(refs) if refs else None)
            del constraints
            reqs, notes, hops = [], [], []
            for req_s, notes_s, hops_s in _bounded_map(pool, _second_half,
                                                      ((f, skew) for f in parts), workers):
                reqs.append(req_s)
                notes.append(notes_s)
                hops.append(hops_s)
        req = pd.concat(reqs)
        del reqs
        req = mark_first_contact(req)
        # One object per pair name (a column of strings made per row), not per request; not
        # _share_strings over the whole table: each column set copies its block here.
        codes, pairs = pd.factorize(req["pair"])
        req["pair"] = np.asarray(pairs, dtype=object)[codes]
        # The legs' sum over the columns any request has, as build_breakdown takes it (a
        # shard's own subset of columns rounds the float sum differently).
        present = [c for c in leg_order() if c in req and req[c].notna().any()]
        if present:
            req["stacked_ms"] = req[present].sum(axis=1, min_count=1)
        hop_rows, hop_words = merge_hops(hops)
        merged = merge_notes(notes)
        # Where build_breakdown puts them: after the request-key notes, before the client's.
        at = sum(1 for n in merged if "shared by several requests" in n)
        merged[at:at] = hop_words
        breakdown = RequestBreakdown(requests=req.reset_index(), skew=skew, notes=merged,
                                     propagation=hop_rows)
        load = SpanLoad(spans=pd.DataFrame({"name": np.array([], dtype=object)}), files=files,
                        skipped=skipped, formats=formats,
                        spans_skipped=sum(sp.skipped for _, sp in per_file),
                        parents_dropped=sum(sp.parents_dropped for _, sp in per_file),
                        notes=_span_notes(per_file) + merge_notes(dup_notes))
        return StreamResult(breakdown=breakdown, load=load, spans=n_spans, shards=shards,
                            names=names, aiperf_records=aiperf_records,
                            aiperf_notes=aiperf_notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _first_half(job):
    """One shard: its spans, then breakdown_part; the part waits in a file for the skew.
    Returns (spans, duplicate note, constraints, reference clock, part file) or None."""
    from kvprof.analysis.breakdown import KNOWN_NAMES, breakdown_part
    from kvprof.analysis.loaders.dedup import drop_duplicate_spans
    from kvprof.analysis.loaders.span_schema import finalize_spans

    work, s, moved, frames, recs, client_host, one_clock, dynamo_records, base = job
    spans = _shard_spans(work, s, moved, frames)
    if spans is None:
        return None
    spans, dup = drop_duplicate_spans(finalize_spans(spans))
    n = len(spans)
    if not spans["name"].isin(KNOWN_NAMES).any():
        return n, dup, None, None, None
    part = breakdown_part(spans, recs, client_host, one_clock, dynamo_records, base=base)
    del spans
    log.info("shard %d: %d requests", s, len(part.req))
    cons = part.constraints.assign(key=None)  # the key is not reported; it costs memory
    part.constraints = None
    file = work / f"part{s:04d}.pkl"
    with file.open("wb") as fh:
        pickle.dump(part, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return n, dup, cons, part.reference, file


def _second_half(job):
    """One shard's part finished on the pooled skew: (requests, notes less the
    propagation's, propagation rows)."""
    from kvprof.analysis.breakdown import finish_breakdown

    file, skew = job
    with file.open("rb") as fh:
        part = pickle.load(fh)
    file.unlink()
    bd = finish_breakdown(part, skew, first_contact=False)
    return (_share_strings(bd.requests), [n for n in bd.notes if n not in part.hop_notes],
            bd.propagation)


def _share_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns of a few distinct values hold one object per value, not one per row
    (same values, same dtype: a million rows of "disaggregated" cost 60 MB otherwise)."""
    import pandas as pd

    for col in frame.columns:
        if not pd.api.types.is_object_dtype(frame[col].dtype):
            continue
        values = frame[col].to_numpy()
        codes, uniques = pd.factorize(values)
        if not len(uniques) or len(uniques) * 4 > len(values):
            continue
        shared = np.asarray(uniques, dtype=object)[codes]
        missing = codes < 0
        shared[missing] = values[missing]  # None stays None, NaN stays NaN
        frame[col] = shared
    return frame


def _bounded_map(pool, fn, jobs, workers: int):
    """pool.map's results in order, with at most 2 x workers jobs (and their arguments)
    held at once: Executor.map would take every job's arguments first."""
    if isinstance(pool, _InProcess):
        yield from map(fn, jobs)
        return
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= 2 * workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _InProcess:
    """pool.map in this process (one worker: no process to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, jobs):
        return map(fn, jobs)


def _give_back_memory() -> None:
    """Hand the reading pass's freed heap back to the system (glibc and Arrow keep it for
    reuse): forked workers then share less, and the peak stays the one the work needs."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _pool(workers: int):
    """Worker processes or this process. Forked (the reading threads are done by then): a
    spawned pool leaves multiprocessing's resource tracker running after it."""
    if workers <= 1:
        return _InProcess()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("fork"))


def _shard_spans(work: Path, s: int, moved, frames: list) -> pd.DataFrame | None:
    """One shard's span rows in read order: its own part files less the traces that moved
    away, plus those that moved in (Arrow-read), then the stdlib-read ones."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    own, moved_in = work / f"shard{s:04d}", work / f"move{s:04d}"
    for p in sorted(own.glob("*.arrow")) if own.exists() else ():
        with pa.memory_map(str(p)) as src:
            t = pa.ipc.open_file(src).read_all()
        if moved is not None:
            t = t.filter(pc.invert(pc.is_in(t["trace_id"], value_set=moved)))
        tables.append(t)
    came = sorted(moved_in.glob("*.arrow")) if moved_in.exists() else []
    for p in came:
        with pa.memory_map(str(p)) as src:
            tables.append(pa.ipc.open_file(src).read_all())
    out = []
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
        del tables
        if came:
            table = table.sort_by(ROW)
        out.append(table.drop_columns([ROW]).to_pandas())
        del table
    shutil.rmtree(own, ignore_errors=True)
    shutil.rmtree(moved_in, ignore_errors=True)
    frames = [f for f in frames if len(f)]
    if frames:
        out.append(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))
    if not out:
        return None
    return out[0] if len(out) == 1 else pd.concat(out, ignore_index=True)


def _drop_parts(work: Path, chunks: list) -> None:
    """Remove the part files of chunks whose file goes another way (stdlib, or skipped)."""
    for c in chunks:
        for p in work.glob(f"shard*/{c.index:06d}.arrow"):
            p.unlink()


def _run(fn, jobs: list) -> list:
    """fn over jobs on the machine's cores (Arrow's parsing and I/O release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs))


def wanted(inputs) -> bool:
    """Whether `kvprof report` streams: --stream on, or auto and local trace files larger
    than STREAM_BYTES (read by kvprof's own loader)."""
    mode = getattr(inputs, "stream", "auto") or "auto"
    if mode == "off" or getattr(inputs, "engine", "pandas") != "pandas":
        return False
    text = str(inputs.traces)
    if "://" in text:
        return False
    if mode == "on":
        return True
    from kvprof.analysis.loaders.traces import trace_files

    path = Path(text)
    try:
        paths = trace_files(path) if path.is_dir() else [path] if path.is_file() else []
    except OSError:
        return False
    return trace_bytes(paths) > STREAM_BYTES


def load_streamed(inputs, data: dict[str, Any]):
    """Step 1 and the breakdown of build_report, streamed: (Sources, RequestBreakdown).

    The inputs other than the traces are read as load_sources reads them; Dynamo's
    request_end records found in the traces folder are the files there that are not OTLP
    JSON lines and hold such records."""
    import pandas as pd

    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import (
        SpanLoad,
        _readable,
        require_kvprof_spans,
        trace_files,
    )
    from kvprof.analysis.pipeline import Sources, load_dynamo_records, load_side_inputs

    path = Path(str(inputs.traces))
    candidates = [str(p) for p in (trace_files(path) if path.is_dir() else [])
                  if not _readable(p)]
    src = Sources(spans_load=SpanLoad(spans=pd.DataFrame(),
                                      skipped=[(f, "") for f in candidates]))
    data["inputs"] = {"traces": {"skipped": []}, "aiperf": None}
    load_dynamo_records(inputs, src, data)
    found = set(candidates) - {f for f, _ in src.spans_load.skipped}
    loader = (lambda: load_aiperf_records(inputs.aiperf)) if inputs.aiperf else None
    result = stream_breakdown(path, loader, inputs.client_host, inputs.one_clock,
                              src.dynamo_records, shards=getattr(inputs, "shards", None),
                              skip_files=found)
    load = result.load
    if result.aiperf_records is not None:
        data["inputs"]["aiperf"] = {"source": str(inputs.aiperf),
                                    "records": result.aiperf_records}
    else:
        del data["inputs"]["aiperf"]
    foreign_only = require_kvprof_spans(SpanLoad(spans=pd.DataFrame(
        {"name": sorted(result.names)})), inputs.traces)
    src.spans_load = load
    src.streamed = True
    src.notes = [*foreign_only, *load.notes,
                 *result.aiperf_notes,
                 LEFT_OUT.format(spans=result.spans, shards=result.shards)]
    data["inputs"]["traces"] = {
        "source": str(inputs.traces), "files": len(load.files), "spans": result.spans,
        "formats": sorted(load.formats),
        "skipped": [{"file": f, "why": w} for f, w in load.skipped],
        "spans_skipped": load.spans_skipped, "parents_dropped": load.parents_dropped,
        "streamed_shards": result.shards}
    data["inputs"] = {"traces": data["inputs"].pop("traces"), **data["inputs"]}
    load_side_inputs(inputs, src, data)
    return src, result.breakdown
