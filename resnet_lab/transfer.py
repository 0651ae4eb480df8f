"""Moving run folders between machines: the GPU machine trains, this one reports.

`export_runs` packs the run store into a gzipped tar split into parts no larger than a limit (the
device tool brings back files of at most 16 MiB); checkpoints of unfinished runs go along only when
asked, so a later GPU session can resume them, and finished runs bring their cached analyses
(`analysis-*.json`: 04's lesions and gradients, hours to recompute on a CPU). `import_runs` merges
parts into a store, keeping whichever copy of each run is further along. An archive is read into
memory and checked whole before the store is touched: only regular files with the names export
writes, each under a `<hash>/` folder whose config.json hashes to that name; nothing in it is ever
extracted by tarfile itself.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable

from .config import RunConfig, is_int, is_number
from .runs import (ANALYSIS_FILE, CHECKPOINT_FILES, FINISHED, RunLocked, _umask, atomic_write_bytes,
                   atomic_write_json, atomic_write_text, can_resume, iter_runs, lock_run, runs_dir)

log = logging.getLogger(__name__)

# How far along a copy of a run is, before its steps: a finished copy beats every unfinished one, and an
# unfinished one that can resume (it has a checkpoint; failed or running alike, both resume) beats one that
# would start again at step 0 whatever its summary says.
RANK = {None: 0, "failed": 1, "running": 2, **dict.fromkeys(FINISHED, 4)}
RESUMES = 3
RUN_FILES = ("config.json", "summary.json", "metrics.csv", "model.pt")  # what every export carries
CHECKPOINT = "checkpoint.pt"  # only with checkpoints=True, only for unfinished runs
ARCHIVE_FILES = RUN_FILES + (CHECKPOINT,)
HASH = re.compile(r"[0-9a-f]{12}")
STRANDED = re.compile(r"\.([0-9a-f]{12})\.(replaced|importing)-")  # what an interrupted import left
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PART_NUMBER = re.compile(r"[0-9]+")
MIN_PART_MB, MAX_PART_MB = 1 / 1024, 15.0  # 1 KiB .. the device tool's file limit, with a margin


def _progress(summary: dict | None, resumable: bool) -> tuple[int, int]:
    """(rank, steps) of a copy of a run: what import and export compare (the greater is further along)."""
    s = summary if isinstance(summary, dict) else {}
    try:
        steps = int(s.get("steps_done") or 0)
    except (TypeError, ValueError, OverflowError):  # JSON's 1e999 is infinity, which int() refuses so
        steps = 0
    status = s.get("status")
    rank = RANK.get(status, 0) if isinstance(status, str) else 0  # a crafted summary's list is no status
    return (RESUMES if resumable and rank < RESUMES else rank), steps


def _parse_summary(data: bytes | None) -> dict | None:
    """A summary.json's content, or None when absent or unreadable (then the run counts as not started)."""
    if data is None:
        return None
    try:
        s = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return s if isinstance(s, dict) else None


def _summary(folder: Path) -> dict | None:
    try:
        return _parse_summary((folder / "summary.json").read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _config_error(h: str, data: bytes) -> str | None:
    """Why `<h>/config.json` does not describe run `h` (None when it does): a run folder is named by the
    hash of its config, and a mismatch would file results under the wrong experiment."""
    try:
        cfg = RunConfig.from_json(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        return f"{h}/config.json is not a valid run config ({e})"
    if cfg.hash != h:
        return f"{h}/config.json hashes to {cfg.hash}, not to its folder name {h}"
    return None


# -- export ------------------------------------------------------------------------------------------
def _check_part_mb(part_mb: float) -> int:
    """Part size in bytes; NaN, inf, tiny or oversized values are refused by name."""
    if not is_number(part_mb) or not MIN_PART_MB <= part_mb <= MAX_PART_MB:
        raise ValueError(f"part_mb={part_mb!r} is not valid: use a number of MiB from 1/1024 (1 KiB) "
                         f"to {MAX_PART_MB:g} (the device tool's file limit, with a margin)")
    return int(part_mb * 2**20)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not EXPORT_NAME.fullmatch(name):
        raise ValueError(f"name={name!r} is not valid: use a plain file name of letters, digits, '.', '_' "
                         f"and '-' that does not start with '.'")
    return name


def _read(path: Path) -> bytes | None:
    """A file's bytes read in one go (a trainer's atomic rename swaps whole files), None if absent."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _run_files(run: Path, checkpoints: bool, again: bool = False) -> dict[str, bytes] | None:
    """The files of one run as they are now, or None when the run must not travel.

    summary.json is read first and decides the rest, so the status shipped is the status of the
    files shipped: a finished run brings model.pt (written before its summary), an unfinished one
    its newest checkpoint when asked for (checkpoint.prev.pt covers the moment a trainer swaps them).
    No lock is taken (a trainer holds its run's for hours), so the files are read in the reverse of the
    order a trainer writes them (metrics, then checkpoint, then summary): the checkpoint before the
    curve, which then reaches at least its step (resuming drops the rows past it), and the summary first,
    which says no more progress than the files shipped with it. A run that finished between the summary
    and the checkpoint (which it then removed) is read `again` as the finished run it is, not shipped as one
    running without a checkpoint (which would start again at step 0 where it lands).
    """
    summary = _read(run / "summary.json")
    config = _read(run / "config.json")
    if config is None:
        return None
    if err := _config_error(run.name, config):
        log.warning("run %s not exported: %s", run.name, err)
        return None
    files = {"config.json": config}
    if summary is not None:
        files["summary.json"] = summary
    finished = (_parse_summary(summary) or {}).get("status") in FINISHED
    if finished:
        model = _read(run / "model.pt")
        if model is None:
            log.warning("run %s not exported: its summary says finished but model.pt is missing (a run restored "
                        "from its record in results/<preset>/runs has no weights)", run.name)
            return None
        files["model.pt"] = model
        for name in analysis_names(run):
            if (data := _read(run / name)) is not None:
                files[name] = data
    if checkpoints and not finished:
        ckpt = next((d for n in CHECKPOINT_FILES if (d := _read(run / n)) is not None), None)
        if ckpt is not None:
            files[CHECKPOINT] = ckpt
        elif not again and (_parse_summary(_read(run / "summary.json")) or {}).get("status") in FINISHED:
            return _run_files(run, checkpoints, again=True)  # it finished meanwhile (and dropped its checkpoints)
    metrics = _read(run / "metrics.csv")
    if metrics is not None:
        files["metrics.csv"] = metrics
    return files


def analysis_names(run: Path) -> list[str]:
    """The cached analyses in a run folder (regular files named like RunDir.analysis_file's)."""
    try:
        return sorted(p.name for p in run.iterdir() if ANALYSIS_FILE.fullmatch(p.name) and p.is_file()
                      and not p.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _run_folders(src: Path) -> list[Path]:
    """Real run folders: named by a hash, not hidden staging, not symlinks."""
    if not src.exists():
        return []
    return sorted(p for p in src.iterdir() if HASH.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def manifest(root: str | os.PathLike | None = None) -> dict[str, dict]:
    """{run hash: {status, steps_done, checkpoint, analyses, weights}} of a store: what this machine already
    has, for `export_runs(skip=)`."""
    return {run.name: _entry(s, analysis_names(run), can_resume(run), (run / "model.pt").is_file())
            for run, _, s in iter_runs(root)}


def _entry(summary: dict | None, analyses: list[str], checkpoint: bool, weights: bool) -> dict:
    """One run's manifest entry: how far along it is, whether it can resume, which cached analyses it has, and
    whether it has its weights (a run restored from its record, `records.restore`, has none)."""
    s = summary or {}
    return {"status": s.get("status"), "steps_done": s.get("steps_done"), "checkpoint": checkpoint,
            "analyses": sorted(analyses), "weights": weights}


def _has_all(entry: dict, files: dict[str, bytes], progress: tuple[int, int]) -> bool:
    """The receiving store has this run as far along and every cached analysis in `files` (a manifest
    written before analyses travelled lists none, so such runs go again; one written before checkpoints
    were listed says none, so an unfinished run may go again, and import keeps the copy that resumes)."""
    have = entry.get("analyses")
    have = set(have) if isinstance(have, list) else set()
    theirs = _progress(entry, entry.get("checkpoint") is True)
    weights = entry.get("weights") is not False or "model.pt" not in files  # a manifest before weights: has them
    return theirs >= progress and {n for n in files if ANALYSIS_FILE.fullmatch(n)} <= have and weights


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """A manifest file as `runs manifest` writes it; ValueError naming the file otherwise."""
    try:
        return _check_manifest(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: cannot read a manifest from it ({e})") from e


def finished_in(entry: object) -> bool:
    """A manifest entry of a finished run (done or diverged): training it again would redo it."""
    return isinstance(entry, dict) and entry.get("status") in FINISHED


def _check_manifest(skip: object) -> dict[str, dict]:
    if skip is None:
        return {}
    shape = ("a manifest is a JSON object {run hash: {status, steps_done, analyses}}, as `resnet-lab runs manifest` "
             "writes it")
    if not isinstance(skip, dict):
        raise ValueError(shape)
    for k, v in skip.items():  # the entry named: a manifest may list hundreds
        if not isinstance(v, dict):
            raise ValueError(f"its entry {k!r} is {v!r}, not an object: {shape}")
        steps = v.get("steps_done")  # None: a run folder without a summary (`_entry`)
        if steps is not None and (not is_int(steps) or steps < 0):
            raise ValueError(f"its entry {k!r} has steps_done={steps!r}: use an integer >= 0 ({shape})")
    return skip


def _pack(src: Path, checkpoints: bool, skips: list[dict[str, dict]], max_bytes: int | None,
          unfinished: bool = False, only: set[str] | None = None
          ) -> tuple[bytes, list[str], list[str], dict[str, dict], list[list[str]]]:
    """The archive, the runs left out because it was full, those no archive of max_bytes can hold, the
    manifest entries of the runs packed, and per manifest the runs it held. Runs one of the manifests `skips` has as far along, with
    every cached analysis, are not packed (import would keep that copy anyway); finished runs go
    first, or are left out when `unfinished`. An unfinished run that its checkpoint alone puts over
    max_bytes goes without it: its curve and summary so far, since no export under the limit could
    ever carry that checkpoint (ResNet-1202's is 155 MB); the manifests are compared with what is sent.
    A finished run the receiver has with its weights, which goes for its new analyses only, comes last: under
    max_bytes, a pack's checkpoints must not wait behind weights the receiver already holds."""
    runs, held = [], [[] for _ in skips]
    for run in _run_folders(src):
        if only is not None and run.name not in only:
            continue
        if unfinished and (_summary(run) or {}).get("status") in FINISHED:  # before _run_files: no warnings for
            continue                                                       # a finished run it would not send
        files = _run_files(run, checkpoints)
        if files is None:
            continue
        summary = _parse_summary(files.get("summary.json"))
        if unfinished and (summary or {}).get("status") in FINISHED:
            continue
        dropped = max_bytes is not None and _tar_size(files) > max_bytes and CHECKPOINT in files
        if dropped:
            files = {n: d for n, d in files.items() if n != CHECKPOINT}
        progress = _progress(summary, CHECKPOINT in files)
        has = [i for i, m in enumerate(skips) if run.name in m and _has_all(m[run.name], files, progress)]
        if has:
            held[has[0]].append(run.name)
            continue
        if dropped:
            log.warning("run %s goes without its checkpoint, which alone is over %.3g MiB: its curve and summary "
                        "so far travel, and it resumes only on the machine that has the checkpoint",
                        run.name, max_bytes / 2**20)
        # finished runs new there first, then unfinished ones (their checkpoints resume), then finished runs whose
        # weights are there already, sent again only for analyses computed here (`analyse` recomputes one lost)
        weighed = progress[0] == RANK["done"] and any(
            finished_in(m.get(run.name)) and m[run.name].get("weights") is not False for m in skips)
        runs.append((2 if weighed else int(progress[0] != RANK["done"]), run.name, files, summary))
    buf = io.BytesIO()
    now, used, left, too_big, packed = int(time.time()), 0, [], [], {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for _, h, files, summary in sorted(runs, key=lambda r: r[:2]):
            size = _tar_size(files)
            if max_bytes is not None and used + size > max_bytes:
                (too_big if size > max_bytes else left).append(h)
                continue
            used += size
            packed[h] = _entry(summary, [n for n in files if ANALYSIS_FILE.fullmatch(n)], CHECKPOINT in files,
                               "model.pt" in files)
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{h}/{name}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), left, too_big, packed, held


def _tar_size(files: dict[str, bytes]) -> int:
    """An upper bound of these files' share of an archive (tar header and padding included)."""
    return sum(len(d) + 1024 for d in files.values())


def _remove_old_parts(dest: Path, name: str) -> None:
    """Parts of an earlier export under the same name go first, so that `<name>.tar.gz.*` is only ever
    parts of one export (a leftover .007 would otherwise be glued onto a new 3-part export)."""
    for p in dest.glob(f"{name}.tar.gz.*"):
        if PART_NUMBER.fullmatch(p.name.rsplit(".", 1)[1]) and p.is_file():
            p.unlink()


class Parts(list):
    """The part files an export wrote, in order; `never_fit` names the runs no export under its max_mb can
    hold (logged, and `runs export` exits 1 on them: they are missing from every such export); `runs` the
    runs it holds; `held_by_skip` and `held_by_sent` those left out because the --skip manifest or the
    --sent ledger has them as far along."""

    def __init__(self, paths: list[Path], never_fit: list[str], runs: list[str] | None = None,
                 held_by_skip: list[str] | None = None, held_by_sent: list[str] | None = None) -> None:
        super().__init__(paths)
        self.never_fit, self.runs = never_fit, runs or []
        self.held_by_skip, self.held_by_sent = held_by_skip or [], held_by_sent or []


def _check_dest(dest: Path) -> Path:
    """The export's folder, made if missing; a path that is a file (or under one) is refused by name."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{str(dest)!r} is not a folder (a file is in the way): give a folder for the parts") from None
    return dest


def export_runs(dest: str | os.PathLike, root: str | os.PathLike | None = None, checkpoints: bool = False,
                part_mb: float = 15.0, name: str = "runs", skip: dict[str, dict] | None = None,
                max_mb: float | None = None, unfinished: bool = False,
                sent: str | os.PathLike | None = None, only: Iterable[str] | None = None) -> Parts:
    """Write `<dest>/<name>.tar.gz.000`, `.001`, ...: every run folder of the store, without
    checkpoints unless `checkpoints` (then only unfinished runs' newest one). Returns the parts.

    unfinished: only runs not finished yet; with `checkpoints`, what a fresh machine needs to resume
    them (a GPU machine starts bare each session; it learns of the finished runs from a manifest).
    only: just these run hashes (`experiments.unanalysed_runs`: finished runs whose cached analysis a GPU
    is to compute).

    skip: a `manifest()` of the machine the parts go to; runs it has as far along stay out, so each
    export carries only what is new there. max_mb: stop adding runs before the archive could pass this
    size (the device tool brings back 64 MiB a call); the runs left out are logged, and the next export
    with an updated manifest takes them (a finished run bigger than max_mb on its own is logged as such:
    it needs an export without the limit, brought back part by part; an unfinished one goes without its
    checkpoint). Each part is written atomically, so a killed export leaves whole parts (and an
    incomplete set, which import names) rather than a cut one.

    sent: a ledger of this machine's exports, in manifest form: runs it has as far along stay out too,
    and the runs of this export are added to it once the parts are written. Back-to-back calls on one
    warm machine need it: their `skip` manifest, written here before the first call, is stale by the
    second, which would otherwise send the first call's runs again (and, under max_mb, only those)."""
    size = _check_part_mb(part_mb)
    try:
        ledger = read_manifest(sent) if sent is not None and Path(sent).exists() else {}
    except ValueError as e:
        raise ValueError(f"--sent ledger {e}") from None
    name = _check_name(name)
    if max_mb is not None and not (is_number(max_mb) and max_mb > 0):
        raise ValueError(f"max_mb={max_mb!r} is not valid: use a positive number of MiB, or None for no limit")
    dest = _check_dest(Path(dest))
    data, left, too_big, packed, held = _pack(runs_dir(root), checkpoints, [_check_manifest(skip), ledger],
                                              None if max_mb is None else int(max_mb * 2**20), unfinished,
                                              None if only is None else set(only))
    if left:
        log.warning("%d run(s) left for the next export (over %g MiB): %s", len(left), max_mb, ", ".join(left))
    for h in too_big:  # waiting would not help: no export under this limit can ever hold it
        if only is not None:  # runs sent to be analysed: the room is what unfinished runs leave, another time more
            log.warning("run %s alone is over %g MiB: it goes to be analysed with an export that has more room",
                        h, max_mb)
            continue
        log.warning("run %s alone is over %g MiB (a finished ResNet-1202's weights are 78 MB), "
                    "so no export under --max-mb holds it: export it without --max-mb into a folder on that "
                    "machine and bring the parts back a few per call; import takes them once all are here",
                    h, max_mb)
    _remove_old_parts(dest, name)
    parts = []
    for i in range(0, max(len(data), 1), size):
        p = dest / f"{name}.tar.gz.{i // size:03d}"
        atomic_write_bytes(p, data[i:i + size])
        parts.append(p)
    if sent is not None:
        atomic_write_json(sent, {**ledger, **packed})
    return Parts(parts, too_big, sorted(packed), *held)


# -- import ------------------------------------------------------------------------------------------
def _ordered_parts(parts: list[str | os.PathLike]) -> list[Path]:
    """The parts in order, after checking they are one export numbered 000, 001, ... without gaps."""
    if not parts:
        raise ValueError("no parts given: pass every <name>.tar.gz.NNN file of one export")
    paths = [Path(p) for p in parts]
    for p in paths:
        stem, _, num = p.name.rpartition(".")
        if not stem or not PART_NUMBER.fullmatch(num):
            raise ValueError(f"{p} is not an export part: part names end in .000, .001, ...")
    stems = {p.name.rpartition(".")[0] for p in paths}
    if len(stems) != 1:
        raise ValueError(f"parts of more than one export given: {sorted(stems)}")
    numbered: dict[int, Path] = {}
    for p in paths:
        n = int(p.name.rpartition(".")[2])
        if n in numbered:
            raise ValueError(f"part {n:03d} given twice: {numbered[n]} and {p}")
        numbered[n] = p
    stem = stems.pop()
    if len(numbered) != max(numbered) + 1:  # counted, not listed: a mistyped .3000000 names millions
        missing = [f"{stem}.{n:03d}" for n in range(min(max(numbered), 10_000)) if n not in numbered][:5]
        more = max(numbered) + 1 - len(numbered) - len(missing)
        raise ValueError(f"export incomplete: part(s) {', '.join(missing)}{f' and {more:,} more' if more else ''} "
                         f"missing (given: {', '.join(sorted(p.name for p in numbered.values())[:10])})")
    return [numbered[n] for n in sorted(numbered)]


def _member_target(m: tarfile.TarInfo) -> tuple[str, str]:
    """(run hash, file name) of an acceptable member; anything else is refused by name."""
    allowed = f"regular files <12-hex hash>/{{{', '.join(ARCHIVE_FILES)}, analysis-<kind>-<12 hex>.json}}"
    if not m.isreg() or m.issparse():  # a sparse member's few bytes would expand to its full size, zeros
        kind = "symlink" if m.issym() else "hard link" if m.islnk() else "folder" if m.isdir() else \
            "sparse file" if m.issparse() else "special file"
        raise ValueError(f"archive member {m.name!r} is a {kind}: an export holds only {allowed}")
    h, sep, name = m.name.partition("/")
    if not sep or not HASH.fullmatch(h) or not (name in ARCHIVE_FILES or ANALYSIS_FILE.fullmatch(name)):
        raise ValueError(f"archive member {m.name!r} is not a run file: an export holds only {allowed}")
    return h, name


def _unpack(data: bytes) -> dict[str, dict[str, bytes]]:
    """{run hash: {file name: bytes}} of a whole tar, read member by member through extractfile."""
    runs: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            h, name = _member_target(m)
            if name in runs.setdefault(h, {}):
                raise ValueError(f"archive member {m.name!r} appears twice")
            runs[h][name] = tar.extractfile(m).read()
    for h, files in runs.items():
        if "config.json" not in files:
            raise ValueError(f"run {h} in the archive has no config.json: it cannot be checked or used")
        if err := _config_error(h, files["config.json"]):
            raise ValueError(f"archive member {err}")
        status = (_parse_summary(files.get("summary.json")) or {}).get("status")
        if isinstance(status, str) and status in FINISHED and "model.pt" not in files:  # as export never sends
            raise ValueError(f"run {h} in the archive says {status} but has no model.pt: taken, it would replace "
                             "a local copy and leave a finished run without its model")
    return runs


def _read_archive(parts: list[Path]) -> dict[str, dict[str, bytes]]:
    """Every run of an export, checked whole; damage of any kind becomes a ValueError naming the parts."""
    names = ", ".join(p.name for p in parts)
    try:  # gzip checks the length and CRC at the end, which tarfile alone may never read
        data = _gunzip(b"".join(_read_part(p) for p in parts), names)
        return _unpack(data)
    except (zlib.error, EOFError, tarfile.TarError) as e:
        raise ValueError(f"{names}: not a complete, readable export ({type(e).__name__}: {e}); "
                         f"pass every part of one export") from e


MAX_EXPANSION, MIN_CEILING = 20, 256 * 2**20  # weights barely compress (~1.1x); zeros do 1000x


def _gunzip(data: bytes, names: str) -> bytearray:
    """gzip.decompress with a ceiling (20x the archive, at least 256 MiB): a few KiB of a crafted archive would
    otherwise expand to gigabytes in memory before a single member is checked."""
    limit, out, rest = max(MIN_CEILING, MAX_EXPANSION * len(data)), bytearray(), data
    while rest:  # one gzip member after another, as gzip.decompress reads them
        d = zlib.decompressobj(wbits=31)
        while rest and not d.eof:
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise ValueError(f"{names}: expands past {limit / 2**20:,.0f} MiB ({MAX_EXPANSION}x its size), "
                                 "more than any export of runs does: refused as a crafted archive")
            rest = d.unconsumed_tail
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        rest = d.unused_data.lstrip(b"\0")  # gzip.decompress also ignores trailing zero padding
    return out  # a bytearray: bytes() would copy it


def _read_part(path: Path) -> bytes:
    """A part's bytes; one that is missing, a folder or unreadable is bad input (ValueError naming it)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"part {str(path)!r} cannot be read ({e.strerror or e}): pass the files of one "
                         f"export") from None


RECOVERING = ".recovering"  # in a run folder while `_recover` moves a copy in: that copy's folder name


def _recover(dst: Path, h: str) -> None:
    """Put back the best whole copy of run `h` an interrupted import left, if it beats the folder's, then remove
    the leftovers (the caller holds h's lock, so they are stale).

    A kill inside `_swap_in` leaves `.<h>.replaced-X` (the old copy, whole) and, if it came between the two
    renames, `.<h>.importing-X` (the new copy, whole: staging ends before the old one moves aside) beside an
    empty folder; an `.importing-X` without its twin was cut off while staging and is never used. A copy
    trained since in the folder is kept unless a leftover is further along (`_progress`). The folder's own
    config.json goes first and the copy's moves in last, so a kill during this leaves a folder without one,
    and RECOVERING names the copy being moved in: the next import finishes moving that one, keeping what
    already came (ranked again, the copy that lost its summary.json to the folder would lose to its twin,
    and the files it gave would read as a restart's)."""
    local = dst / h
    mark = local / RECOVERING
    whole = []
    for old in dst.glob(f".{h}.replaced-*"):
        twin = dst / old.name.replace(".replaced-", ".importing-", 1)
        whole += [c for c in (old, twin) if (c / "config.json").is_file()]
    named = mark.read_text().strip() if mark.is_file() else None
    resumed = next((c for c in whole if c.name == named), None)  # it keeps its config.json until its last move
    if resumed is None:
        mark.unlink(missing_ok=True)  # a recovery killed after its last move, or nothing to resume
    if whole:
        rank = lambda c: _progress(_summary(c), can_resume(c))  # noqa: E731
        best = resumed or max(whole, key=lambda c: (rank(c), c.name))
        if resumed or not (local / "config.json").exists() or rank(best) > rank(local):
            moved = {f.name for f in best.iterdir() if f.is_file() and f.name != ".lock"}
            if resumed is None:
                for f in local.iterdir():  # what the folder holds that the copy does not (a checkpoint of a restart)
                    if f.is_file() and f.name != ".lock" and f.name not in moved:
                        f.unlink()
                atomic_write_text(mark, best.name)
                (local / "config.json").unlink(missing_ok=True)  # a folder half-replaced must not look whole
            # config.json last and summary.json just before it, so a kill part-way never leaves a folder that
            # reads as finished without its model.pt; the rest by name, the same order in every process
            for name in sorted(moved, key=lambda n: (n == "config.json", n == "summary.json", n)):
                os.replace(best / name, local / name)
            mark.unlink()
            log.warning("run %s: put back the copy an interrupted import left aside (%s)", h, best.name)
    _remove_leftovers(dst, h)


def stranded(folder: str | os.PathLike) -> bool:
    """Whether an import (or a recovery) killed part-way left copies of this run aside or a folder half
    moved in: its status then says nothing until `recover_stranded` has run under the run's lock."""
    folder = Path(folder)
    return (folder / RECOVERING).exists() or \
        any(STRANDED.match(p.name) for p in folder.parent.glob(f".{folder.name}.*"))


def recover_stranded(folder: str | os.PathLike) -> None:
    """Put back the copy of this run an import killed mid-swap left aside, if any (the caller holds the run's
    lock): a trainer coming after such a kill resumes or reuses that copy instead of training from step 0."""
    folder = Path(folder)
    if stranded(folder):
        _recover(folder.parent, folder.name)


def _remove_leftovers(dst: Path, h: str) -> None:
    """Staging folders of an import of run `h` that was killed; safe because we hold h's lock."""
    for p in [*dst.glob(f".{h}.importing*"), *dst.glob(f".{h}.replaced*")]:
        shutil.rmtree(p, ignore_errors=True)


def _swap_in(dst: Path, h: str, files: dict[str, bytes]) -> None:
    """Replace `<dst>/<h>` (which exists: the lock made it) by the imported files.

    The run's lock file lives outside the folder (`runs.lock_file`), so a trainer waiting on it, or one that
    makes the folder again between the two renames, waits for this import and then reads what it brought
    (a rename onto an empty folder succeeds). The folder's own `.lock` (the code before `.locks` locked
    only that one) is hard-linked into the new folder, so such a process waiting on it and one opening it
    after the swap contend for the same lock. Leftovers of an earlier, interrupted import were dealt with
    by `_recover` under the same lock."""
    local = dst / h
    staged = Path(tempfile.mkdtemp(prefix=f".{h}.importing-", dir=dst))
    old = dst / staged.name.replace(".importing-", ".replaced-", 1)
    try:
        os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it 0700
        for name, data in files.items():
            atomic_write_bytes(staged / name, data)
        with contextlib.suppress(OSError):  # the folder's own lock, for processes of the code before `.locks`
            os.link(local / ".lock", staged / ".lock")
        os.replace(local, old)  # move aside first: at every moment one complete copy exists
        try:
            os.replace(staged, local)
        except BaseException:
            os.replace(old, local)
            raise
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _add_analyses(local: Path, summary: dict | None, files: dict[str, bytes]) -> int:
    """Cached analyses the local copy of a finished run lacks (each names the model.pt it came from, and a
    reader ignores one of another model, so adding one can never change a result)."""
    if (summary or {}).get("status") not in FINISHED:
        return 0
    new = [n for n in files if ANALYSIS_FILE.fullmatch(n) and not (local / n).exists()]
    for n in new:
        atomic_write_bytes(local / n, files[n])
    return len(new)


def _merge_run(dst: Path, h: str, files: dict[str, bytes]) -> str:
    """Take one run if the store lacks it or has it less far along (`_progress`: a copy that can resume
    beats one that cannot, whatever their steps); else only the cached analyses the local copy lacks.
    Never wait for a busy run."""
    local = dst / h
    try:
        with lock_run(local, wait=False):
            _recover(dst, h)
            mine = _summary(local)
            ours = _progress(mine, can_resume(local))
            theirs = _progress(_parse_summary(files.get("summary.json")), CHECKPOINT in files)
            had = (local / "config.json").exists()
            # a finished copy without weights (a record: export never sends one) never costs a local copy its
            # weights or its checkpoint; a copy with weights replaces a finished local one that lacks them
            if had and "model.pt" not in files and theirs[0] == RANK["done"] \
                    and ((local / "model.pt").exists() or can_resume(local)):
                added = _add_analyses(local, mine, files)
                return "kept local: it has its weights or a checkpoint, this copy has neither" + \
                    (f"; {added} cached analysis file(s) added" if added else "")
            if had and ours[0] == theirs[0] == RANK["done"] and "model.pt" in files and not (local / "model.pt").exists():
                _swap_in(dst, h, files)
                return "imported: it brings the weights the local copy lacked"
            if had and ours >= theirs:
                added = _add_analyses(local, mine, files)
                if ours[0] == RESUMES and theirs[1] > ours[1]:  # say what was passed over, and why
                    return f"kept local: it resumes from its checkpoint, the copy at step {theirs[1]} has none"
                return f"kept local, {added} cached analysis file(s) added" if added else "kept local"
            _swap_in(dst, h, files)
            if had and ours[1] > theirs[1]:  # replaced a copy with more steps: say why
                if theirs[0] == RESUMES and ours[0] < RESUMES:
                    return f"imported: it resumes from its checkpoint, the local copy at step {ours[1]} had none"
                came = (_parse_summary(files.get("summary.json")) or {}).get("status")
                return f"imported: {came} at step {theirs[1]}, over a local copy {(mine or {}).get('status')} at " \
                       f"step {ours[1]}"
            return "imported"
    except RunLocked:
        return "skipped: a local process (a trainer?) holds its lock; import again once it is done"


def import_runs(parts: list[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, str]:
    """Merge exported parts (all of one export, in any order) into the store: {run hash: what happened}.

    A run is taken when the store lacks it or has it less far along: failed < running < unfinished with a
    checkpoint (failed or running: it resumes) < done, then fewer steps < more. So a local copy that can
    resume is never replaced by one that would start again at step 0 (an export over --max-mb drops
    checkpoints), a local run done is never replaced (it only gains the cached analyses it lacks; a
    diverged one gives way to a copy that got further), and a run whose lock a local process holds is
    skipped. A damaged, incomplete, missing or crafted archive raises ValueError before the store is touched.
    """
    runs = _read_archive(_ordered_parts(parts))
    dst = runs_dir(root)
    dst.mkdir(parents=True, exist_ok=True)
    _recover_all(dst)
    return {h: _merge_run(dst, h, files) for h, files in sorted(runs.items())}


def _recover_all(dst: Path) -> None:
    """`_recover` for every run an interrupted import left copies of, not only those this archive brings (those
    are recovered again, harmlessly, by `_merge_run`); a run someone is training is left alone."""
    for h in sorted({m.group(1) for p in dst.glob(".*") if (m := STRANDED.match(p.name))}):
        try:
            with lock_run(dst / h, wait=False):
                _recover(dst, h)
        except RunLocked:
            pass
