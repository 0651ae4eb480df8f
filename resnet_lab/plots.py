"""Paper-style figures: one style, one function per figure, each taking a DataFrame and returning the figure."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"


def set_style() -> None:
    """One look for every figure; TrueType fonts in PDFs (journals reject Type 3)."""
    sns.set_theme(context="paper", style="ticks", palette=PALETTE, font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": 300, "figure.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})


def save(fig, out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Save `fig` as PNG and PDF (300 dpi, tight) under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        tmp = out / f".{name}.tmp.{ext}"
        fig.savefig(tmp, bbox_inches="tight", dpi=300)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def _curves_long(metrics: pd.DataFrame) -> pd.DataFrame:
    """metrics rows -> one row per (step, curve) with error in %."""
    m = metrics.copy()
    long = m.melt(id_vars=[c for c in m.columns if c not in ("train_err", "test_err")],
                  value_vars=["train_err", "test_err"], var_name="curve", value_name="err")
    long["error (%)"] = 100 * long["err"].astype(float)
    long["curve"] = long["curve"].map({"train_err": "train", "test_err": "test"})
    long["iterations"] = long["step"]
    return long


def degradation_figure(metrics: pd.DataFrame):
    """He et al. Fig. 6: training (dashed) and test (solid) error vs iterations; plain left, ResNet right."""
    set_style()
    long = _curves_long(metrics)
    long["net"] = long["arch"].map({"plain": "plain", "resnet": "ResNet"}).fillna(long["arch"])
    long["depth"] = long["depth"].astype(str)
    g = sns.relplot(data=long, x="iterations", y="error (%)", hue="depth", style="curve",
                    style_order=["test", "train"], dashes={"test": "", "train": (4, 2)}, col="net",
                    col_order=[c for c in ("plain", "ResNet") if c in set(long["net"])], kind="line",
                    errorbar=("ci", 95), height=3.2, aspect=1.1, facet_kws={"sharey": True})
    g.set_titles("{col_name}")
    return g.figure
