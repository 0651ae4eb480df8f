"""What each notebook runs: its grid of configs, and its tables from the run store.

A notebook (or `resnet-lab report`) calls `configs_*` to name its runs, `train_all` to make sure they
exist (or `collect` to read them without training), then the table functions here and the figure
functions in `plots`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from .analysis import summarize
from .config import RunConfig, make_config
from .data import load_cifar10, resolve_source
from .runs import atomic_write_csv, load_metrics, load_runs, results_dir
from .train import RunRecord, train

log = logging.getLogger(__name__)


def check_grid(name: str, values: list, allowed: Iterable | None = None, positive: bool = False) -> list:
    """Grid parameters fail before any training: empty lists, bad values, unknown names."""
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"{name}={values!r} is not valid: give a non-empty list")
    for v in values:
        if allowed is not None and v not in allowed:
            raise ValueError(f"{name} contains {v!r}: allowed are {list(allowed)}")
        if positive and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} contains {v!r}: use integers >= 0")
    return list(values)


# -- dataset identity without decoding ----------------------------------------------------------------
@lru_cache(maxsize=8)
def _file_sha(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_id(source: str | os.PathLike | None = None) -> str:
    """The 16-hex-digit id a run records for the CIFAR-10 copy in use (cheap for a tarball)."""
    p = resolve_source(source)
    if p is not None and p.is_file():
        st = p.stat()
        return _file_sha(str(p), st.st_mtime, st.st_size)[:16]
    return load_cifar10(source).info.sha256[:16]  # folders and downloads: the cache knows


def with_dataset(cfgs: Iterable[RunConfig], source: str | os.PathLike | None = None) -> list[RunConfig]:
    ds = dataset_id(source)
    return [c if c.dataset else dataclasses.replace(c, dataset=ds) for c in cfgs]


# -- running and reading ---------------------------------------------------------------------------
def train_all(cfgs: Iterable[RunConfig], device: str | None = None, root: str | os.PathLike | None = None,
              source: str | os.PathLike | None = None, **kw: Any) -> list[RunRecord | None]:
    """Train every config not yet in the store; a failure is logged and stored, the others go on."""
    dev = None if device in (None, "auto") else device
    data = load_cifar10(source)
    out: list[RunRecord | None] = []
    for cfg in cfgs:
        try:
            out.append(train(cfg, root=root, device=dev, data=data, **kw))
        except Exception as e:  # the run folder says 'failed' with the error; keep going
            log.error("run %s failed: %s", cfg.name, e)
            out.append(None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def collect(cfgs: Iterable[RunConfig], root: str | os.PathLike | None = None,
            source: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[RunConfig]]:
    """(runs, curves, missing) for these configs, read from the store: nothing is trained."""
    cfgs = with_dataset(cfgs, source)
    hashes = [c.hash for c in cfgs]
    runs = load_runs(root)
    if runs.empty:
        return runs, load_metrics(root), cfgs
    runs = runs[runs["hash"].isin(hashes)].reset_index(drop=True)
    curves = load_metrics(root, hash=hashes) if not runs.empty else load_metrics(root).iloc[0:0]
    have = set(runs.loc[runs["status"].isin(["done", "diverged"]), "hash"])
    return runs, curves, [c for c in cfgs if c.hash not in have]


def output_dir(preset: str, notebook: str) -> Path:
    """results/<preset>/<notebook>/, created."""
    d = results_dir() / preset / notebook
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_table(df: pd.DataFrame, out_dir: str | os.PathLike, name: str) -> Path:
    p = Path(out_dir) / f"{name}.csv"
    atomic_write_csv(df, p)
    return p


# -- 01 degradation ------------------------------------------------------------------------------------
def degradation_configs(preset: str, depths: list[int], seeds: list[int]) -> list[RunConfig]:
    """Plain and ResNet nets at each depth and seed (He et al. 2015, Fig. 6)."""
    check_grid("depths", depths)
    check_grid("seeds", seeds, positive=True)
    return [make_config(preset, arch=a, depth=d, seed=s) for a in ("plain", "resnet") for d in depths for s in seeds]


def degradation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final train/test error per (arch, depth), mean ± 95% CI over seeds."""
    return summarize(runs, ["arch", "depth"])


def degradation_claims(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's two claims, checked on our numbers: deeper plain trains worse; deeper ResNet does not."""
    rows = []
    for arch, says in (("plain", "deeper has HIGHER training error"), ("resnet", "deeper has LOWER training error")):
        t = table[table["arch"] == arch].sort_values("depth")
        if len(t) < 2:
            continue
        lo, hi = t.iloc[0], t.iloc[-1]
        higher = hi["train_err_%"] > lo["train_err_%"]
        holds = higher if arch == "plain" else not higher
        rows.append({"arch": arch, "paper says": says,
                     "shallow": f"{int(lo['depth'])}: {lo['train_err_%']:.1f}%",
                     "deep": f"{int(hi['depth'])}: {hi['train_err_%']:.1f}%", "holds here": bool(holds)})
    return pd.DataFrame(rows)
