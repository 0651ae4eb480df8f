"""Rebuild every notebook's tables and figures from the run store, training nothing.

Each notebook is re-executed through papermill with `train_missing=False` (and `analyse_missing=False`
where it caches slow analyses: 04's take hours on a CPU) and the parameters of the
`report:` section of its grid in sweeps/ for this preset (the paper grids say which seeds and depths
make the combined tables), else those it was last executed with (read from
`results/<preset>/executed/<notebook>.ipynb`), else its defaults; so the report is the notebooks' own
code: missing runs are listed in the notebook, never trained, and runs without a cached analysis are
named with the `resnet-lab analyse` command that computes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from .config import check_preset
from .experiments import NOTEBOOKS_DIR
from .records import RECORD, recorded_runs, records_dir, restore, save  # RECORD: the metadata key
from .runs import atomic_write_text, load_runs, results_dir, runs_dir
from .sweep import OUTPUT_VAR, check_kernel, environ, kernel_env, notebook_parameters, report_parameters

log = logging.getLogger(__name__)
NOT_REPORTED = {"00_report"}  # the report notebook itself


def notebooks(directory: Path = NOTEBOOKS_DIR) -> list[str]:
    """Notebook stems in notebooks/, in order."""
    return sorted(p.stem for p in directory.glob("*.ipynb") if p.stem not in NOT_REPORTED)


def executed_parameters(path: Path) -> dict[str, Any]:
    """The parameters papermill injected into an executed notebook (empty if none or unreadable)."""
    try:
        nb = json.loads(Path(path).read_text())
        return dict(nb.get("metadata", {}).get("papermill", {}).get("parameters", {}) or {})
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def absolute_path_vars() -> Iterator[None]:
    """Relative RESNET_LAB_DATA/_RESULTS/... and PYTHONPATH entries made absolute in os.environ while notebooks
    execute, and the package named for the kernel to compare with its own (`sweep.kernel_env`), then restored.

    papermill starts the kernel in notebooks/ with this process's environment: a relative path (the README's
    `RESNET_LAB_DATA=../shared/...`) would resolve from there, or point the kernel at another run store.
    """
    with environ(kernel_env()):
        yield


def build(preset: str = "quick", only: list[str] | None = None, kernel: str | None = None,
          directory: Path = NOTEBOOKS_DIR, force: bool = False) -> pd.DataFrame:
    """Re-execute each notebook for `preset` from stored runs; one row per notebook with its status.

    The preset's committed run records (results/<preset>/runs, `records`) are merged into the store first,
    so a clone redraws what its tables were drawn from; they are written again after, for what was drawn.
    A notebook is `kept`, not redrawn, where a run its tables were drawn from is missing from the store, or
    is no longer drawn with these parameters (other seeds or depths, not finished, no cached analysis:
    `_lost_runs`; force: redraw it from what is drawn now)."""
    check_preset(preset)
    names = notebooks(directory)
    if only:
        bad = sorted(set(only) - set(names))
        if bad:
            raise ValueError(f"unknown notebook(s) {bad}: use some of {names}")
        names = [n for n in names if n in only]
    if kernel is not None:  # None: each notebook's own kernel
        check_kernel(kernel)
    wanted = report_parameters(preset)  # a bad grid stops the report before any notebook runs
    _restore(preset)
    try:
        with absolute_path_vars():
            status = pd.DataFrame([_build_one(name, preset, kernel, directory, wanted.get(name, {}), force)
                                   for name in names])
    except BaseException:  # a Ctrl-C, say: the notebooks done by then have new tables, which the claims must describe
        try:
            _describe(preset)
        except Exception:  # logged, so that it does not hide what ended the report
            log.exception("the claims or RESULTS.md of %s could not be rewritten", preset)
        raise
    _describe(preset)
    return status


def _restore(preset: str) -> None:
    """The preset's committed records into the store (a copy further along there is kept), said in one line."""
    try:
        done = restore(records_dir(preset))
    except OSError as e:  # a store this user may only read: the notebooks draw from what it holds
        log.warning("the run records in %s could not be put into the run store (%s)", records_dir(preset), e)
        return
    taken = sum(what.startswith("imported") for what in done.values())
    if taken:
        log.info("%d of the %d run records in %s put into the run store (%s)", taken, len(done), records_dir(preset),
                 runs_dir())


def _describe(preset: str) -> None:
    """The run records of what the executed notebooks drew (`records.save`); results/<preset>/claims.csv and
    .md, and RESULTS.md, from the tables the notebooks just wrote."""
    from .claims import check
    from .page import write_page

    try:
        save(preset)
    except OSError as e:  # the tables are written; their records wait for the next report
        log.error("the run records of %s could not be written (%s)", preset, e)
    check(preset)
    write_page(preset)


def _build_one(name: str, preset: str, kernel: str | None, directory: Path,
               wanted: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Re-execute one notebook into results/<preset>/executed/<name>.ipynb; its row of `build`'s table.

    papermill writes its output as it goes, so it executes into a hidden file beside it that replaces the
    executed notebook only once it ran clean: a failed (or interrupted) report keeps the last good one, and
    the failed execution, whose error cell is the log, is kept as <name>.failed.ipynb. The notebook's tables
    and figures (results/<preset>/<name>/), which it writes as it goes, are put back as they were too: the
    claims are read from them, and they must stay those of the executed notebook beside them."""
    import papermill as pm

    out_dir = results_dir() / preset / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = results_dir() / preset / name
    out, failed = out_dir / f"{name}.ipynb", out_dir / f"{name}.failed.ipynb"
    tmp = out_dir / f".{name}.executing-{os.getpid()}.ipynb"
    params = {**executed_parameters(out), **wanted, "preset": preset}
    declared = notebook_parameters(directory / f"{name}.ipynb")
    for flag in ("train_missing", "analyse_missing"):
        if flag in declared:
            params[flag] = False
    params = {k: v for k, v in params.items() if k in declared}
    t0 = time.time()
    try:
        backup, guarded = _backup(tables, out), True
    except OSError as e:  # a full disk, say: the notebook still runs, unguarded
        backup, guarded = None, False
        log.warning("could not copy %s aside (%s): if this execution fails, its tables stay as it leaves them",
                    tables, e)
    drawn = _runs_drawn(name, params)
    why = None if force else _lost_runs(out, tables, drawn)
    if why:  # nothing ran: the copy aside goes, the folder is as it was
        if guarded:
            _settle(tables, backup, ok=True)
        log.warning("%s: %s", name, why)
        return {"notebook": name, "status": "kept", "seconds": 0.0, "output": str(out), "error": why}
    ok = False
    try:
        with environ({OUTPUT_VAR: str(tables.absolute())}):  # the committed folder (by hand: scratch/)
            pm.execute_notebook(str(directory / f"{name}.ipynb"), str(tmp), parameters=params, kernel_name=kernel,
                                cwd=str(directory), progress_bar=False)
        after = _runs_drawn(name, params) if drawn else None  # a run that finished meanwhile was drawn too
        _record_output_path(tmp, out, sorted(set(drawn[0]) | set(after[0] if after else [])) if drawn else None)
        os.replace(tmp, out)
        ok = True  # from here on its tables are those of the executed notebook
        failed.unlink(missing_ok=True)  # the log of an earlier failure no longer describes the notebook
        status, error, written = "done", "", out
    except Exception as e:  # the failed execution keeps papermill's error cell: it is the log
        status, error = "failed", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        written = failed if tmp.exists() else None
        if written:
            os.replace(tmp, failed)
        kept = f"the last good execution is kept in {out}" if out.exists() else f"no earlier execution in {out}"
        log.error("report of %s failed: %s (%s; %s)", name, error,
                  f"this execution's log: {failed}" if written else "papermill wrote no output", kept)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted execution: the good one stays as it was
        if guarded:
            try:
                _settle(tables, backup, ok)
            except OSError as e:  # the notebook's own outcome is what the report row says; this is logged
                log.error("could not put %s back as it was (%s); the earlier tables are in %s", tables, e, backup)
    return {"notebook": name, "status": status, "seconds": round(time.time() - t0, 1),
            "output": str(written or out), "error": error}




def _runs_drawn(name: str, params: dict[str, Any]) -> tuple[list[str], int] | None:
    """`experiments.drawn_runs`, or None where the store cannot tell (a notebook that reads no runs, parameters
    it rejects, no dataset to fingerprint: the notebook itself then says what is wrong)."""
    from .experiments import drawn_runs

    try:
        return drawn_runs(name, params)
    except Exception as e:  # noqa: BLE001
        log.info("%s: the run store cannot tell which of its runs it holds (%s)", name, e)
        return None


def _has_rows(tables: Path) -> bool:
    """Whether any table in the folder has a row (a notebook run with no runs stored writes only headers)."""
    for f in tables.glob("*.csv"):
        try:
            if len(pd.read_csv(f)) > 0:
                return True
        except (OSError, ValueError):  # an empty or unreadable file: no rows to lose
            continue
    return False


def _lost_runs(executed: Path, tables: Path, drawn: tuple[list[str], int] | None) -> str | None:
    """Why a notebook's tables and figures are kept rather than redrawn: a run the execution that wrote them
    read is not in the store (or, for 04, lacks its cached analysis), so redrawing would lose it. A clone has
    no run store (it is git-ignored): redrawing there replaced committed results with empty tables and deleted
    the figures. Without a record (an execution by make reproduce before it stamped them, or by papermill),
    only tables with rows where the store holds none of the runs are kept. None: redraw."""
    if drawn is None or not (tables.is_dir() and any(tables.glob("*.csv"))):  # nothing there to lose
        return None
    have, need = drawn
    before = recorded_runs(executed)
    head = (f"its tables and figures are kept: the run store ({runs_dir()}) holds {len(have)} of the {need} runs "
            "it reads")
    absent = (f"the store is git-ignored and {executed.parent.parent / 'runs'} has no record of them it could "
              "restore: bring them with `resnet-lab runs import`, or train them; `report --force` redraws from what is stored")
    if before is None:
        if have or not _has_rows(tables):
            return None
        return f"{head}, and its tables have rows drawn from runs it does not hold; {absent}"
    lost = set(map(str, before)) - set(have)
    if not lost:
        return None
    stored = set(load_runs()["hash"])
    out, there = sorted(lost - stored), sorted(lost & stored)
    parts = []
    if out:
        parts.append(f"{len(out)} of the {len(before)} runs its tables were drawn from are not in it ({_few(out)}): "
                     + absent)
    if there:
        analyse = ", or no cached analysis: `resnet-lab analyse`" if _reads_cache(executed) else ""
        parts.append(f"{len(there)} of the {len(before)} runs its tables were drawn from are stored but not drawn "
                     f"now ({_few(there)}: other parameters, not finished{analyse}); `report --force` redraws "
                     "without them")
    return f"{head}; " + "; ".join(parts)


def _few(hashes: list[str]) -> str:
    return ", ".join(hashes[:3]) + (", ..." if len(hashes) > 3 else "")


def _reads_cache(executed: Path) -> bool:
    """Whether the notebook executed here reads cached analyses (04)."""
    from .experiments import NOTEBOOK_ANALYSES

    return executed.stem in NOTEBOOK_ANALYSES


def stamp(preset: str, executed_dir: Path | None = None) -> None:
    """Record in each executed notebook of `preset` the runs its tables are drawn from, as `report` does for
    its own executions: `make reproduce` executes them with papermill and calls this after; then the run
    records of those runs (`records.save`)."""
    folder = executed_dir or results_dir() / preset / "executed"
    for name in notebooks():
        nb = folder / f"{name}.ipynb"
        if nb.exists():
            drawn = _runs_drawn(name, {**executed_parameters(nb), "preset": preset})
            if drawn is not None:
                _record_output_path(nb, nb, drawn[0])
    save(preset, folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(folder: Path, kind: str) -> list[Path]:
    """`.<name>.<kind>-<pid>` folders beside `folder` whose report process is gone (killed outright)."""
    out = []
    for p in folder.parent.glob(f".{folder.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            out.append(p)
    return out


BACKUP_MARK = ".backup.json"  # inside a copy aside: written last, so a copy without it is incomplete


def _identity(path: Path) -> list[int] | None:
    """Which file `path` is now (inode, mtime): a notebook replaced by a finished execution is another file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_mtime_ns]


def _backup(folder: Path, executed: Path) -> Path | None:
    """A copy of a notebook's output folder beside it (hidden), or None when it has none yet.

    A copy left by a report killed outright (`kill -9`, a lost machine) holds the last good tables, which that
    report never put back: they are restored first, but only where the copy is whole (its mark, written last,
    is there) and the execution it guarded never finished (the executed notebook is still the one the mark
    names). A copy killed part-way, or one whose execution had already replaced the notebook, is dropped."""
    for old in _leftovers(folder, "before"):
        try:
            mark = json.loads((old / BACKUP_MARK).read_text())
        except (OSError, ValueError):
            mark = None
        if isinstance(mark, dict) and mark.get("executed") == _identity(executed):
            log.warning("%s: a report was killed while executing this notebook; its last good tables are put back",
                        folder)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(old, folder)
            (folder / BACKUP_MARK).unlink(missing_ok=True)
        else:  # a copy killed part-way, or its execution finished (its tables are those in the folder)
            shutil.rmtree(old, ignore_errors=True)
    for kind in ("failed", "copying"):
        for old in _leftovers(folder, kind):
            shutil.rmtree(old, ignore_errors=True)
    if not folder.is_dir():
        return None
    backup = folder.parent / f".{folder.name}.before-{os.getpid()}"
    partial = folder.parent / f".{folder.name}.copying-{os.getpid()}"
    for p in (backup, partial):
        shutil.rmtree(p, ignore_errors=True)
    try:
        shutil.copytree(folder, partial, ignore=shutil.ignore_patterns(BACKUP_MARK))
        # the mark goes in last, and the folder's rename commits the copy
        (partial / BACKUP_MARK).write_text(json.dumps({"executed": _identity(executed)}))
        os.replace(partial, backup)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return backup


def _settle(folder: Path, backup: Path | None, ok: bool) -> None:
    """After an execution: keep its outputs if it ran clean, else put the folder back as it was."""
    if not ok:
        aside = folder.parent / f".{folder.name}.failed-{os.getpid()}"
        if folder.exists():
            os.replace(folder, aside)
        if backup is not None:
            os.replace(backup, folder)
            (folder / BACKUP_MARK).unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
    elif backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _record_output_path(executed: Path, path: Path, runs: list[str] | None = None) -> None:
    """papermill records the path it wrote in the notebook's metadata: make it the one the notebook is kept
    under, not the temporary name it was executed into (which also changed with every run). Beside it, the
    runs its tables were drawn from (`_lost_runs` reads them back)."""
    nb = json.loads(executed.read_text(encoding="utf-8"))  # notebooks are UTF-8 whatever the locale
    if not isinstance(nb, dict):
        return
    nb.setdefault("metadata", {}).setdefault("papermill", {})["output_path"] = str(path)
    if runs is not None:
        nb["metadata"][RECORD] = {"runs": list(runs)}
    # nbformat's own layout, as papermill wrote it
    atomic_write_text(executed, json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False,
                                           separators=(",", ": ")) + "\n")


def show(preset: str) -> None:
    """Display every table (rounded) and figure under results/<preset>/ in a notebook, each under a heading."""
    from IPython.display import Image, Markdown, display

    for r in outputs(preset).to_dict("records"):
        display(Markdown(f"### {r['notebook']} · {r['name']}"))
        display(pd.read_csv(r["path"]).round(3) if r["kind"] == "csv" else Image(filename=r["path"], width=720))


def outputs(preset: str) -> pd.DataFrame:
    """Every table and figure under results/<preset>/, one row each (notebook, kind, path)."""
    base = results_dir() / preset
    rows = [{"notebook": p.parent.name, "kind": p.suffix[1:], "name": p.stem, "path": str(p)}
            for p in sorted(base.glob("*/*"))
            if p.suffix in (".csv", ".png") and p.parent.name != "executed" and not p.parent.name.startswith(".")]
    return pd.DataFrame(rows, columns=["notebook", "kind", "name", "path"])
