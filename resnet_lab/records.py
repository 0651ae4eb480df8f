"""Run records: the small files of the runs a preset's committed tables are drawn from, committed beside them.

The run store (results/runs/) is git-ignored: it holds weights and checkpoints. So a clone, or the next
machine a GPU session lands on, has none of the runs behind results/<preset>/: `report` cannot redraw a
figure there, and the next session's tables would see only the runs it trained. results/<preset>/runs/<hash>/
keeps, for each run an executed notebook of the preset was drawn from, its config.json, summary.json,
metrics.csv and cached analyses (no weights: kilobytes a run). `report` puts them into the store before it
draws (`restore`, through the import's merge: a copy further along in the store is kept) and writes them
after (`save`); `resnet-lab runs import results/<preset>/runs` does the first by hand.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .runs import atomic_write_bytes, results_dir, runs_dir

log = logging.getLogger(__name__)

RECORD = "resnet_lab"  # an executed notebook's metadata key: {"runs": the hashes its tables were drawn from}


def records_dir(preset: str) -> Path:
    """results/<preset>/runs: committed, unlike the store (results/runs)."""
    return results_dir() / preset / "runs"


def _record_files(run: Path, weights: bool = False) -> dict[str, bytes]:
    """A run folder's files that a record keeps, and its model.pt with `weights` (a folder of run folders given
    to `restore` keeps its weights); regular files only: a link is never followed. Read summary first and curve
    last, the reverse of a trainer's order (curve, checkpoint, summary), so the curve reaches the summary's step."""
    from .transfer import analysis_names

    names = ["summary.json", "config.json", *(["model.pt"] if weights else []), *analysis_names(run), "metrics.csv"]
    out = {}
    for name in names:
        f = run / name
        if f.is_file() and not f.is_symlink():
            out[name] = f.read_bytes()
    return out


def recorded_runs(executed: Path) -> list | None:
    """The runs an executed notebook records its tables as drawn from (its metadata's RECORD), or None where it
    records none (executed before records, by papermill by hand, or unreadable)."""
    try:
        runs = json.loads(executed.read_text(encoding="utf-8"))["metadata"][RECORD]["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return runs if isinstance(runs, list) else None


def drawn_hashes(executed_dir: Path) -> tuple[set[str], bool]:
    """(the runs the executed notebooks in a folder record their tables as drawn from, whether every executed
    notebook that reads runs has that record): one without it (a papermill run by hand, an interrupted `make
    reproduce`, a damaged file) may have drawn any run, so then no record is pruned."""
    from .experiments import NOTEBOOK_CONFIGS, READS_NO_RUNS
    from .transfer import HASH

    hashes: set[str] = set()
    complete = True
    for nb in sorted(executed_dir.glob("*.ipynb")):
        runs = recorded_runs(nb)
        if runs is None:
            complete &= nb.stem not in NOTEBOOK_CONFIGS or nb.stem in READS_NO_RUNS
            continue
        hashes |= {h for h in runs if isinstance(h, str) and HASH.fullmatch(h)}
    return hashes, complete


def _read_run(src: Path) -> dict[str, bytes] | None:
    """The record files of a store's run, read under its lock where the store lets us take it (a trainer or an
    import holding it: None, and the record stays as it was until the next report)."""
    from .runs import RunLocked, lock_run
    from .transfer import stranded

    if stranded(src):  # an import killed part-way: its status says nothing until it is recovered
        return None
    try:
        with lock_run(src, wait=False):
            return _record_files(src)
    except RunLocked:
        log.info("run %s is held by another process: its record is left as it was", src.name)
        return None
    except OSError:  # a store this user may only read: no lock to take, and no trainer of ours writing there
        return _record_files(src)


def save(preset: str, executed_dir: Path | None = None) -> int:
    """Write the record of every run the preset's executed notebooks were drawn from (from the store; a run the
    store lacks keeps the record it has), and remove the records no executed notebook names (only where every
    one of them says what it drew: `drawn_hashes`). Each file is written atomically and only where its bytes
    changed, so an unchanged run leaves git quiet; a linked record folder is neither written through nor
    removed. Returns the number of records written, changed or removed."""
    from .transfer import HASH

    folder = records_dir(preset)
    wanted, complete = drawn_hashes(executed_dir or results_dir() / preset / "executed")
    store, changed = runs_dir(), 0
    for h in sorted(wanted):
        src, dst = store / h, folder / h
        if not (src / "config.json").is_file() or src.is_symlink():
            continue
        if dst.is_symlink():
            log.warning("record %s is a link: not written through", dst)
            continue
        files = _read_run(src)
        if files is None or "config.json" not in files:
            continue
        old = {p.name for p in dst.iterdir() if p.is_file() and not p.is_symlink()} if dst.is_dir() else set()
        wrote = False
        for name, data in files.items():
            if name in old and (dst / name).read_bytes() == data:
                continue
            atomic_write_bytes(dst / name, data)
            wrote = True
        for name in sorted(old - set(files)):  # an analysis of another revision, a summary now gone
            (dst / name).unlink()
            wrote = True
        changed += wrote
    if complete and folder.is_dir():
        for p in sorted(folder.iterdir()):
            if HASH.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and p.name not in wanted:
                shutil.rmtree(p)
                changed += 1
    return changed


def restore(source: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, str]:
    """Merge a folder of records (results/<preset>/runs) into the store, as `runs import` merges an export:
    {run hash: what happened}. A record without its config (or whose config hashes elsewhere: a run of
    another version of the code) is passed over with a warning; a missing folder restores nothing."""
    from .transfer import HASH, _config_error, _merge_run

    src = Path(source)
    if not src.is_dir():
        return {}
    dst = runs_dir(root)
    done: dict[str, str] = {}
    for p in sorted(src.iterdir()):
        if not (p.is_dir() and HASH.fullmatch(p.name)) or p.is_symlink():
            continue
        files = _record_files(p, weights=True)
        err = "it has no config.json" if "config.json" not in files else _config_error(p.name, files["config.json"])
        if err:
            log.warning("record %s not restored: %s", p, err)
            done[p.name] = f"not restored: {err}"
            continue
        dst.mkdir(parents=True, exist_ok=True)
        done[p.name] = _merge_run(dst, p.name, files)
    return done
