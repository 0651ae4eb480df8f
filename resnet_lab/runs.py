"""The run store: one folder per config hash, written atomically, read back as pandas DataFrames."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch

from .config import RunConfig

PROJECT_RESULTS = Path(__file__).resolve().parent.parent / "results"
METRIC_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "seconds"]
STATUSES = ("running", "done", "failed", "diverged")


def results_dir() -> Path:
    """$RESNET_LAB_RESULTS, else the project's results/."""
    return Path(os.environ.get("RESNET_LAB_RESULTS", PROJECT_RESULTS))


def runs_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else results_dir() / "runs"


# -- atomic writes ------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    atomic_write_text(path, df.to_csv(index=False))


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
        try:
            return json.loads(self.summary_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def status(self) -> str | None:
        s = self.summary()
        return s.get("status") if s else None

    def metrics(self) -> pd.DataFrame:
        if not self.metrics_file.exists():
            return pd.DataFrame(columns=METRIC_COLUMNS)
        return pd.read_csv(self.metrics_file)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on this run: a second process asking for the same config waits here."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained model of a finished run (weights only; never unpickles code)."""
        from .models import model_from_config

        if not self.model_file.exists():
            raise FileNotFoundError(f"run {self.cfg.hash} ({self.cfg.name}) has no model.pt: train it first")
        model = model_from_config(self.cfg)
        model.load_state_dict(torch.load(self.model_file, map_location=device, weights_only=True))
        return model.to(device).eval()


# -- many runs ---------------------------------------------------------------------------------------
def iter_runs(root: str | os.PathLike | None = None) -> Iterator[tuple[Path, dict, dict | None]]:
    d = runs_dir(root)
    if not d.exists():
        return
    for p in sorted(d.iterdir()):
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue
        try:
            summ = json.loads((p / "summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            summ = None
        yield p, cfg, summ


SUMMARY_COLUMNS = ["status", "final_train_err", "final_test_err", "final_train_loss", "final_test_loss",
                   "params", "flops", "wall_seconds", "device", "dataset_sha256", "official_pixels",
                   "steps_done", "warmup_end_step", "step_mode", "packed_runs", "grouped_runs"]


def load_runs(root: str | os.PathLike | None = None, **where: Any) -> pd.DataFrame:
    """One row per run: config columns + final metrics. `where` filters on columns, e.g. preset='quick'."""
    rows = []
    for p, cfg, summ in iter_runs(root):
        row = {"hash": p.name, **cfg}
        row["milestones"] = tuple(row.get("milestones", ()))
        for k in SUMMARY_COLUMNS:
            row[k] = (summ or {}).get(k)
        if summ is None:
            row["status"] = "running"
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for k, v in where.items():
        if k not in df.columns:
            raise KeyError(f"no column {k!r} in runs; columns are {sorted(df.columns)}")
        df = df[df[k].isin(v) if isinstance(v, (list, tuple, set)) else df[k] == v]
    df["name"] = [RunConfig.from_json(r).name for r in df.to_dict("records")]
    return df.reset_index(drop=True)


def load_metrics(root: str | os.PathLike | None = None, **where: Any) -> pd.DataFrame:
    """Long-form curves: one row per evaluation of every selected run, with its config columns."""
    runs = load_runs(root, **where)
    frames = []
    base = runs_dir(root)
    for r in runs.to_dict("records"):
        f = base / r["hash"] / "metrics.csv"
        if f.exists():
            m = pd.read_csv(f)
            for k in ("hash", "name", "arch", "depth", "block_layers", "shortcut", "bottleneck", "seed", "preset",
                      "status"):
                m[k] = r[k]
            frames.append(m)
    if not frames:
        return pd.DataFrame(columns=METRIC_COLUMNS + ["hash", "name", "arch", "depth", "seed", "preset"])
    return pd.concat(frames, ignore_index=True)
