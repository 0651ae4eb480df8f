"""The run store: one folder per config hash, written atomically, read back as pandas DataFrames."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import torch

from .config import ADDED_FIELDS, RunConfig

# how a summary joins its sittings' devices, dtypes and step modes ("NVIDIA H200 + cpu (...)"): not a comma,
# which a CPU's name has of its own; tables join and the results page splits their devices the same way
JOINED = " + "

PROJECT_RESULTS = Path(__file__).resolve().parent.parent / "results"
METRIC_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "seconds"]
# a finished run's cached analysis: analysis-<kind>-<12 hex of its parameters>.json (RunDir.write_analysis)
ANALYSIS_FILE = re.compile(r"analysis-[a-z]+-[0-9a-f]{12}\.json")

log = logging.getLogger(__name__)


def results_dir() -> Path:
    """$RESNET_LAB_RESULTS, else (unset or empty, as make reads it) the project's results/."""
    return Path(os.environ.get("RESNET_LAB_RESULTS") or PROJECT_RESULTS)


def runs_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else results_dir() / "runs"


# -- atomic writes ------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read from /proc where it can be (os.umask alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive a crash; best-effort (some filesystems refuse a folder fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half.

    The file gets the mode a plain open() would give (mkstemp makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (Python writes a bare NaN, which strict readers,
    JavaScript's or jq's --strict, refuse), and a diverged run's final loss is one."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def read_csv(source: str | os.PathLike | io.StringIO) -> pd.DataFrame:
    """pd.read_csv that gives back the floats to_csv wrote, bit for bit: pandas 2's default parser reads about
    one in five 1 ulp off (a resumed run, which rewrites its earlier rows, would change them); pandas 3 reads
    them exactly and deprecates the argument that asks for it."""
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(source, **exact)


# -- run locks ----------------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    """Another process holds a run's lock (raised only to callers that asked not to wait)."""


LOCKS = ".locks"  # <runs>/.locks/: every lock file of a store, outside the run folders an import swaps


def lock_file(folder: str | os.PathLike, name: str | None = None) -> Path:
    """`<runs>/.locks/<hash>.lock` (or `<hash>.<name>.lock`): beside the run folder, not in it, so the file
    keeps its inode when an import swaps the folder, and one process's mkdir in the gap between the import's
    two renames cannot give it a fresh, uncontended lock."""
    folder = Path(folder)
    return folder.parent / LOCKS / f"{folder.name}{'.' + name if name else ''}.lock"


@contextlib.contextmanager
def _flock(path: Path, wait: bool, busy: str, waiting: str = "") -> Iterator[None]:
    """Exclusive flock on `path` (made if absent, never followed through a symlink: O_NOFOLLOW, so a planted
    link cannot make the open truncate another file); RunLocked(busy) at once when wait=False and it is held.
    Where it waits, it says so first (`waiting`, a warning): a notebook cell waiting in silence for another
    kernel's hours of training reads as hung."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            if not wait:
                raise RunLocked(busy) from e
            if waiting:
                log.warning("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_run(folder: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Exclusive lock of a run (`lock_file(folder)`), the one lock trainers and imports share; the run folder
    is made if absent. wait=False raises RunLocked at once instead of waiting.

    The folder's own `.lock`, where versions before `.locks` locked, is taken too, second (and an import
    hard-links it into the folder it swaps in, as they did), so a process still running the old code (a
    kernel, a sweep started before an update) and this one exclude each other."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    busy = f"run {folder.name} is locked by another process (a trainer or an import)"
    waiting = f"run {folder.name} is held by another process (a trainer or an import): waiting for it, then " \
              f"using what it leaves"
    with _flock(lock_file(folder), wait, busy, waiting), _flock(folder / ".lock", wait, busy, waiting):
        yield


# -- one run ----------------------------------------------------------------------------------------
class RunDir:
    """The files of one run: config.json, metrics.csv, summary.json, checkpoint.pt, model.pt."""

    def __init__(self, cfg: RunConfig, root: str | os.PathLike | None = None):
        self.cfg = cfg
        self.path = runs_dir(root) / cfg.hash

    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    summary_file = property(lambda self: self.path / "summary.json")
    checkpoint_file = property(lambda self: self.path / "checkpoint.pt")
    model_file = property(lambda self: self.path / "model.pt")

    def summary(self) -> dict[str, Any] | None:
        """The stored summary, or None where there is none or it is unreadable (a half-written or damaged
        file reads as a run that has not finished: it is never averaged, and training it resumes or redoes it)."""
        return _read_json_dict(self.summary_file)

    def status(self) -> str | None:
        s = self.summary()
        return s.get("status") if s else None

    def live_status(self) -> str | None:
        """The stored status, but 'stopped' for a 'running' run that no process holds: a run cut short
        (--time-budget, a kill) stays 'running' on disk and resumes from its checkpoint when asked again."""
        status = self.status()
        if status != "running":
            return status
        try:
            with lock_run(self.path, wait=False):
                return "stopped"
        except RunLocked:
            return "running"
        except OSError:  # a store this user may only read: no lock to try, so say what is on disk
            return status

    def metrics(self) -> pd.DataFrame:
        """The evaluations so far (no rows where the file is missing, empty or unreadable)."""
        return _read_metrics(self.metrics_file)

    def load_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained model of a finished run (weights only; never unpickles code)."""
        return self.load_model_and_sha256(device)[0]

    def load_model_and_sha256(self, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, str]:
        """The model and the sha256 of the very bytes it was loaded from (what a cached analysis names)."""
        from .fast import to_device
        from .models import model_from_config

        try:
            data = self.model_file.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run {self.cfg.hash} ({self.cfg.name} seed {self.cfg.seed}) has no model.pt in {self.path}: "
                + ("a run restored from its record (results/<preset>/runs) has no weights; import the run with them "
                   "(`resnet-lab runs import` of an export), or remove the folder and train it again"
                   if self.status() in FINISHED else "train it first")) from None
        model = model_from_config(self.cfg)
        model.load_state_dict(torch.load(io.BytesIO(data), map_location=device, weights_only=True))
        return to_device(model, device).eval(), hashlib.sha256(data).hexdigest()

    # -- cached analyses: hours of lesions and gradients on a CPU, computed once (on the GPU) and reused ----
    def analysis_file(self, kind: str, params: Mapping[str, Any]) -> Path:
        """analysis-<kind>-<hash of params>.json in the run folder."""
        if not re.fullmatch(r"[a-z]+", kind):
            raise ValueError(f"analysis kind {kind!r} is not valid: use lowercase letters only")
        blob = json.dumps({"kind": kind, **params}, sort_keys=True, default=str).encode()
        return self.path / f"analysis-{kind}-{hashlib.sha256(blob).hexdigest()[:12]}.json"

    def read_analysis(self, kind: str, params: Mapping[str, Any]) -> dict[str, pd.DataFrame] | None:
        """The tables write_analysis stored for these parameters and this very model.pt, else None
        (absent, unreadable, other parameters, or a model.pt that has changed since). A run without model.pt
        (restored from its record, `records`) takes the tables its record brought."""
        f = self.analysis_file(kind, params)
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        try:
            model: str | None = hashlib.sha256(self.model_file.read_bytes()).hexdigest()
        except FileNotFoundError:  # a run restored from its record (results/<preset>/runs) has no weights
            model = None          # here: its cached tables are all there is of them, and nothing contradicts them
        except OSError:
            return None
        if not isinstance(rec, dict) or rec.get("params") != _plain(params) or not isinstance(rec.get("tables"), dict) \
                or (model is not None and rec.get("model_sha256") != model):
            return None
        try:
            return {name: read_csv(io.StringIO(text)) for name, text in rec["tables"].items()}
        except (TypeError, ValueError, pd.errors.ParserError) as e:
            log.warning("cached analysis %s is unreadable (%s): computing it again", f, e)
            return None

    @contextlib.contextmanager
    def analysis_lock(self, kind: str, params: Mapping[str, Any]) -> Iterator[None]:
        """Held while one process computes this analysis, so a second one (a notebook beside `resnet-lab
        analyse`, two reports) waits and reads the cached tables instead of spending as long again. Not the
        run's lock: an import must not skip a finished run because it is being analysed. A store this user
        may only read has no lock to take: each process then computes its own."""
        path = lock_file(self.path, self.analysis_file(kind, params).stem)
        waiting = f"{self.cfg.name} seed {self.cfg.seed} (run {self.cfg.hash}): another process is computing its " \
                  f"{kind} analysis: waiting for it, then reading its tables"
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(_flock(path, True, "", waiting))
            except OSError as e:
                log.debug("analysis of run %s computed without a lock: %s", self.cfg.hash, e)
            yield

    def write_analysis(self, kind: str, params: Mapping[str, Any], tables: Mapping[str, pd.DataFrame],
                       model_sha256: str, **meta: Any) -> dict[str, pd.DataFrame]:
        """Store a finished run's analysis tables (atomically) and return them as read_analysis will: read
        back from CSV text, so a fresh result and a cached one are the same frames. A notebook's analysis goes
        through `experiments._measure`, which takes the analysis lock, loads the model with the sha256 this
        needs and records where and how long; `kind` is lowercase letters, and `params` should carry a
        revision of the measure (e.g. UNRAVEL_REVISION), so that changing it ignores the older caches."""
        text = {name: df.to_csv(index=False) for name, df in tables.items()}
        rec = {"kind": kind, "params": _plain(params), "model_sha256": model_sha256, **meta, "tables": text}
        try:
            atomic_write_json(self.analysis_file(kind, params), rec)
        except OSError as e:  # a read-only store still gets its tables, computed again next time
            log.warning("analysis of run %s not cached: %s", self.cfg.hash, e)
        return {name: read_csv(io.StringIO(t)) for name, t in text.items()}


def _plain(params: Mapping[str, Any]) -> Any:
    """params as they read back from JSON (tuples become lists), so a stored record compares equal."""
    return json.loads(json.dumps(dict(params), sort_keys=True, default=str))


FINISHED = ("done", "diverged")  # a diverged run is a result too: trained again, it diverges again
# the newest, and the one before it (kept as a fallback until the run finishes)
CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint.prev.pt")


def can_resume(folder: Path) -> bool:
    """The run folder holds a checkpoint a trainer resumes from."""
    return any((folder / n).is_file() for n in CHECKPOINT_FILES)


def _read_json_dict(path: Path) -> dict | None:
    """A JSON object from `path`, or None where it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: bad JSON, and bytes that are not UTF-8
        return None
    return obj if isinstance(obj, dict) else None


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        return read_csv(path)
    except FileNotFoundError:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    except (OSError, ValueError) as e:  # empty (a kill before the first row), damaged, not a file
        log.warning("%s is unreadable (%s): its run has no curve", path, e)
        return pd.DataFrame(columns=METRIC_COLUMNS)


# -- many runs ---------------------------------------------------------------------------------------
_warned: set[tuple[str, str]] = set()  # (folder, why): a notebook reads the store often, and says each once


def _warn_once(folder: Path, why: str) -> None:
    if (str(folder), why) not in _warned:
        _warned.add((str(folder), why))
        log.warning("%s", why)


def iter_runs(root: str | os.PathLike | None = None) -> Iterator[tuple[Path, dict, dict | None]]:
    """(folder, config, summary or None) of every run folder; hidden folders and stray files are skipped,
    and so, with a warning, is a folder whose config is damaged or hashes to another name (a run of another
    version of the code: an architecture revised since, a field this version does not know, or hashed as
    numbers were before; no config of this version asks for it): one bad folder must not stop every table
    of the store, nor pass for the run its config reads as here. An unreadable summary reads as None (not
    finished). `root` is the run store itself (results/runs), not the results folder above it."""
    d = runs_dir(root)
    if not d.is_dir():
        if root is not None:  # the default store simply does not exist yet; a folder named by hand is a typo
            _warn_once(d, f"no run store at {d}: no runs read (the store is the folder of run hashes, "
                          "results/runs by default)")
        return
    if root is not None and (d / "runs").is_dir():
        _warn_once(d, f"{d} holds a runs/ folder: if it is the results folder, the run store is {d / 'runs'}")
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_dir():  # `.<hash>.importing` / `.replaced`: an import's staging
            continue
        if not (p / "config.json").exists():
            continue
        cfg = _read_json_dict(p / "config.json")
        try:
            if cfg is None:
                raise ValueError("config.json is not a readable JSON object")
            h = RunConfig.from_json(cfg).hash
        except (TypeError, ValueError) as e:
            _warn_once(p, f"run folder {p} skipped: {e}")
            continue
        if h != p.name:
            _warn_once(p, f"run folder {p} skipped: its config.json hashes to {h} here, so it is a run of another "
                          "version of the code (an architecture revised since, a field this version does not "
                          "know, or an older hashing), which no config of this version names")
            continue
        yield p, cfg, _read_json_dict(p / "summary.json")


SUMMARY_COLUMNS = ["status", "final_train_err", "final_test_err", "final_train_loss", "final_test_loss",
                   "params", "macs", "flops", "wall_seconds", "device", "compute_dtype", "dataset_sha256",
                   "official_pixels",
                   "steps_done", "warmup_end_step", "step_mode", "packed_runs", "grouped_runs"]


# what a config.json lacking a field meant: the value every run stored before the field had (ADDED_FIELDS: pad_fill
# "black"), else the field's default
FIELD_DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING},
                  **{k: v for k, v in ADDED_FIELDS.items() if k in RunConfig.__dataclass_fields__}}


def load_runs(root: str | os.PathLike | None = None, **where: Any) -> pd.DataFrame:
    """One row per run: config columns + final metrics + name. `where` filters on columns, e.g.
    preset='quick'. `root`: the run store (results/runs by default), not the results folder."""
    rows = []
    for p, cfg, summ in iter_runs(root):
        row = {"hash": p.name, **FIELD_DEFAULTS, **cfg}  # a run stored before a field existed: what it meant
        row["milestones"] = tuple(row["milestones"])
        for k in SUMMARY_COLUMNS:
            row[k] = (summ or {}).get(k)
        if summ is None:
            row["status"] = "running"
        rows.append(row)
    # an empty store still has the columns, so `runs[runs["status"] == "done"]` is simply empty
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["hash", *RunConfig.__dataclass_fields__,
                                                               *SUMMARY_COLUMNS])
    df["name"] = [RunConfig.from_json(r).name for r in df.to_dict("records")]  # before filtering: a column too
    for k, v in where.items():
        if k not in df.columns:
            raise KeyError(f"no column {k!r} in runs; columns are {sorted(df.columns)}")
        df = df[_where(df[k], v)]
    return df.reset_index(drop=True)


def _where(col: pd.Series, v: Any) -> pd.Series:
    """The rows of a `load_runs` filter: None matches a missing value (NaN compares unequal to everything), a
    tuple a column of tuples (milestones) whole, and a list, set or other tuple any one of its values."""
    if v is None:
        return col.isna()
    if isinstance(v, tuple) and any(isinstance(x, tuple) for x in col):
        return col.map(lambda x: x == v).astype(bool)
    if isinstance(v, (list, tuple, set)):
        return col.isin(list(v))
    return col == v


# the run columns each row of `load_metrics` carries: every config field (but `lr`, the evaluation's own
# learning rate there), so curves of two configs never merge; the hash, name and status
RUN_COLUMNS = ("hash", "name", *(f.name for f in dataclasses.fields(RunConfig) if f.name not in METRIC_COLUMNS),
               "status")


def load_metrics(root: str | os.PathLike | None = None, **where: Any) -> pd.DataFrame:
    """Long-form curves: one row per evaluation of every selected run, with its config columns (`lr` is the
    evaluation's learning rate; the run's base rate is in `load_runs`)."""
    runs = load_runs(root, **where)
    frames = []
    base = runs_dir(root)
    for r in runs.to_dict("records"):
        m = _read_metrics(base / r["hash"] / "metrics.csv")
        if not m.empty:
            for k in RUN_COLUMNS:
                m[k] = [r[k]] * len(m)  # a tuple (milestones) is one value per row, not a column of values
            frames.append(m)
    if not frames:  # the columns of a non-empty result, so a filter or groupby on one works either way
        return pd.DataFrame(columns=[*METRIC_COLUMNS, *RUN_COLUMNS])
    return pd.concat(frames, ignore_index=True)
