"""Paper-style figures: one style, one function per figure, each taking a DataFrame and returning the figure."""
from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import pandas as pd
import seaborn as sns

from .analysis import check_seeds_only
from .runs import METRIC_COLUMNS, atomic_write_bytes

PALETTE = "colorblind"


def t_interval(values: Sequence[float] | pd.Series) -> tuple[float, float]:
    """Mean ± the Student-t 95% half-width: the interval the tables print (`analysis.ci95`), and the
    one every errorbar over seeds draws.

    seaborn's ("ci", 95) is a bootstrap, several times narrower than this with 2-3 seeds, so a
    figure would promise more certainty than its table.
    """
    from .analysis import ci95

    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    mean, half = float(v.mean()), ci95(v)
    half = 0.0 if math.isnan(half) else half  # one seed: no bar (the table says "not estimated" with NaN)
    return mean - half, mean + half


def t_interval_error(values: Sequence[float] | pd.Series) -> tuple[float, float]:
    """`t_interval` for an error rate in %, clipped to [0, 100]: with two or three seeds the t-interval
    of a noisy early evaluation can pass both ends, which no error rate can."""
    return _clipped(values, 100.0)


def t_interval_gate(values: Sequence[float] | pd.Series) -> tuple[float, float]:
    """`t_interval` for a mean gate, clipped to [0, 1], the range of the sigmoid it averages."""
    return _clipped(values, 1.0)


def _clipped(values: Sequence[float] | pd.Series, top: float) -> tuple[float, float]:
    lo, hi = t_interval(values)
    return max(lo, 0.0), min(hi, top)


def _iterations_axis(g, long: pd.DataFrame, lines: list[str]) -> None:
    """Iterations in thousands ("32k"), as the paper's figures write them; and an error axis from 0 that
    fits the curves after their first tenth, so a 64k-iteration run's last points (a few %) stay
    readable beside its first evaluations (~50%): those may run off the top, as in He et al.'s Fig. 6.
    lines: the columns that tell the figure's lines apart (hue, col): each line's mean over seeds counts."""
    from matplotlib.ticker import FuncFormatter

    last = float(long["iterations"].max())
    keys = list(dict.fromkeys(["iterations", "curve", *[c for c in lines if c]]))
    means = long[long["iterations"] >= 0.1 * last].groupby(keys)["error (%)"].mean()
    top = float(means.max()) if len(means) else 100.0
    top = 100.0 if math.isnan(top) else min(100.0, 5 * math.ceil(1.15 * top / 5 + 1e-9))
    for ax in g.axes.flat:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))
        ax.set_ylim(0, top)


def set_style() -> None:
    """One look for every figure; TrueType fonts in PDFs (journals reject Type 3)."""
    sns.set_theme(context="paper", style="ticks", palette=PALETTE, font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": 300, "figure.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})


def no_data_figure(what: str) -> Figure:
    """What a figure function returns when nothing is stored for it yet (the paper runs arrive a GPU session at
    a time): a notebook still runs to the end and says so; `save` writes no file for it."""
    set_style()
    fig, ax = plt.subplots(figsize=(4.2, 1.0))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: no finished runs stored yet", ha="center", va="center")
    fig.no_data = True
    return fig


CI_BAND = "Student-t 95% CI over seeds (none with one seed)"
ERROR_BAND = f"{CI_BAND}, clipped to 0-100%"  # what `t_interval_error` draws
CHANCE_ERR = 90.0  # % test error of guessing among CIFAR-10's 10 classes


def note(fig: Figure, text: str) -> Figure:
    """Add a line of small grey text under the figure: a PNG read on its own says which runs it draws
    (`experiments.runs_note`) and what its bands are. Returns the figure."""
    if not text or getattr(fig, "no_data", False):
        return fig
    fig._note_lines = getattr(fig, "_note_lines", []) + [text]
    _place_note(fig)
    return fig


NOTE_FONT_PT = 7
NOTE_CHAR_IN = 0.55 * NOTE_FONT_PT / 72  # an average character's width at that size, inches


def _place_note(fig: Figure) -> None:
    """Put the notes just under everything else drawn (tick labels and axis titles spill below the figure's
    own edge, which `bbox_inches="tight"` then takes in), wrapped to that width: a long line would widen
    the saved image and carry a legend anchored to the figure's edge away from its axes."""
    lines = getattr(fig, "_note_lines", []) + ([fig._save_note] if getattr(fig, "_save_note", "") else [])
    art = getattr(fig, "_note_artist", None)
    if not lines:
        return
    if art is None:
        art = fig._note_artist = fig.text(0, 0, "", ha="left", va="top", fontsize=NOTE_FONT_PT, color="0.35")
    art.set_visible(False)
    box = fig.get_tightbbox(fig._get_renderer())  # inches, without the note (any backend, not just Agg)
    art.set_visible(True)
    width = max(40, int(box.width / NOTE_CHAR_IN))
    art.set_text("\n".join(textwrap.fill(line, width) for line in lines))
    art.set_position((box.x0 / fig.get_figwidth(), box.y0 / fig.get_figheight() - 0.02))


def save(fig: Figure, out_dir: str | os.PathLike, name: str, note_text: str = "") -> list[Path]:
    """Save `fig` as PNG and PDF (300 dpi, tight) under out_dir, with `note_text` (what runs it shows) under
    it; returns the paths (none for a no-data figure, which removes the files an earlier save left: a
    figure of runs no longer in the store must not sit beside a table that has none).

    Same figure, same bytes: regenerating results leaves unchanged figures unchanged in git (saving a figure
    again replaces its note_text, it does not add a second one)."""
    if getattr(fig, "no_data", False):
        for ext in ("png", "pdf"):
            (Path(out_dir) / f"{name}.{ext}").unlink(missing_ok=True)
        return []
    fig._save_note = note_text
    _place_note(fig)  # also: the figure may have changed since its notes were added
    for leg in fig.legends:  # seaborn's grid legend sits at the figure's right middle: pinned to the figure as drawn,
        leg.set_bbox_to_anchor((1, 0.5), transform=fig.transFigure)  # not to the tight box, which takes the note in
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        buf = io.BytesIO()
        # no creation date in the PDF: a regenerated figure that did not change stays byte-identical
        fig.savefig(buf, bbox_inches="tight", dpi=300, format=ext,
                    metadata={"CreationDate": None} if ext == "pdf" else None)
        atomic_write_bytes(p, buf.getvalue())  # the mode a table beside it gets (a bare mkstemp file is 0600)
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


def _curves_to_draw(metrics: pd.DataFrame, by: Sequence[str | None]) -> pd.DataFrame | None:
    """`_curves_long(metrics)`, or None where there is no error to draw (no rows, or only NaN: runs
    killed before their first evaluation). Each line (`by`) must be the seeds of one config."""
    check_seeds_only(metrics, [c for c in by if c], ignore=METRIC_COLUMNS)
    long = _curves_long(metrics) if not metrics.empty else None
    return None if long is None or long["error (%)"].isna().all() else long


def degradation_figure(metrics: pd.DataFrame) -> Figure:
    """He et al. Fig. 6: training (dashed) and test (solid) error vs iterations; plain left, ResNet right."""
    long = _curves_to_draw(metrics, ["arch", "depth"])
    if long is None:
        return no_data_figure("degradation curves")
    set_style()
    long["net"] = long["arch"].map({"plain": "plain", "resnet": "ResNet"}).fillna(long["arch"])
    long["depth"] = long["depth"].astype(str)
    g = sns.relplot(data=long, x="iterations", y="error (%)", hue="depth",
                    hue_order=sorted(long["depth"].unique(), key=int), style="curve",
                    style_order=["test", "train"], dashes={"test": "", "train": (4, 2)}, col="net",
                    col_order=[c for c in ("plain", "ResNet") if c in set(long["net"])], kind="line",
                    errorbar=t_interval_error, height=3.2, aspect=1.1, facet_kws={"sharey": True})
    g.set_titles("{col_name}")
    _iterations_axis(g, long, ["net", "depth"])
    return note(g.figure, f"dashed: training error (running mean since the last evaluation), solid: test error; "
                          f"bands: {ERROR_BAND}")


def curves_figure(metrics: pd.DataFrame, hue: str = "name", col: str | None = None,
                  title: str | None = None) -> Figure:
    """Training (dashed) and test (solid) error vs iterations, one line per `hue` (and `col`)."""
    long = _curves_to_draw(metrics, [hue, col])
    if long is None:
        return no_data_figure(title or "error curves")
    set_style()
    if pd.api.types.is_numeric_dtype(long[hue]):  # depths: categories in the legend, not a colour scale
        long[hue] = long[hue].astype(str)
    order = sorted(long[hue].unique(), key=lambda v: (len(str(v)), str(v)))  # "20" before "110"
    g = sns.relplot(data=long, x="iterations", y="error (%)", hue=hue, hue_order=order, style="curve", style_order=["test", "train"],
                    dashes={"test": "", "train": (4, 2)}, col=col, kind="line", errorbar=t_interval_error, height=3.2,
                    aspect=1.2)
    _iterations_axis(g, long, [hue, col])
    if title:
        g.figure.suptitle(title, y=1.02)
    return note(g.figure, f"dashed: training error (running mean since the last evaluation), solid: test error; "
                          f"bands: {ERROR_BAND}")


def depth_figure(runs: pd.DataFrame, paper: dict[int, float] | None = None) -> Figure:
    """Test error vs depth, mean with a 95% CI band over seeds (Student t), the paper's numbers as crosses."""
    d = runs[runs["status"] == "done"].assign(**{"test error (%)": lambda x: 100 * x["final_test_err"].astype(float)})
    if d.empty:
        return no_data_figure("test error vs depth")
    check_seeds_only(d, ["depth"])
    set_style()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    sns.lineplot(data=d, x="depth", y="test error (%)", marker="o", errorbar=t_interval_error, ax=ax, label="ours")
    if paper:
        ks = sorted(k for k in paper if k in set(d["depth"]))
        ax.plot(ks, [paper[k] for k in ks], "x", color="k", label="He et al. 2015")
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(d["depth"])), [str(k) for k in sorted(set(d["depth"]))])
    ax.minorticks_off()
    ax.legend(frameon=False)
    return note(fig, f"band: {ERROR_BAND}")


def bars_figure(runs: pd.DataFrame, x: str, order: list[str] | None = None, hue: str | None = "depth",
                y: str = "final_test_err", ylabel: str = "test error (%)") -> Figure:
    """Bars of final error per category (mean with a Student-t 95% CI over seeds)."""
    d = runs[runs["status"] == "done"].assign(**{ylabel: lambda r: 100 * r[y].astype(float)})
    if d.empty:
        return no_data_figure(ylabel)
    check_seeds_only(d, [x, hue] if hue else [x])
    set_style()
    if hue:
        d[hue] = d[hue].astype(str)
    if order is not None:  # the categories asked for that have runs, in the order asked
        order = [v for v in order if v in set(d[x])]
    g = sns.catplot(data=d, x=x, y=ylabel, hue=hue, order=order, kind="bar", errorbar=t_interval_error, height=3.2,
                    aspect=1.8, palette=PALETTE)
    g.tick_params(axis="x", labelrotation=30)
    return note(g.figure, f"bars: mean; whiskers: {ERROR_BAND}")


def gates_figure(gates: pd.DataFrame) -> Figure:
    """Mean gate per block: a highway block's share of its residual branch; a gated block's shortcut x (1 - g)."""
    if gates.empty:  # also where the variants asked for hold no gated net
        return no_data_figure("gates (highway and gated nets)")
    set_style()
    g = sns.relplot(data=gates, x="block", y="mean_gate", hue="net", kind="line", marker="o",
                    errorbar=t_interval_gate, height=3.0, aspect=1.5)
    g.set_axis_labels("block (from 0)", "mean gate g(x)")
    return note(g.figure, f"band: {CI_BAND}, clipped to 0-1")


def responses_figure(resp: pd.DataFrame) -> Figure:
    """He et al. Fig. 7: std of each 3x3 layer's response, in layer order (top) and sorted (bottom); colour by
    depth, solid ResNet and dashed plain (the pair the figure compares), one line per seed (a t band over
    2-3 seeds would run below zero)."""
    if resp.empty:
        return no_data_figure("layer responses")
    set_style()
    d = resp.assign(net=resp["arch"].map({"plain": "plain", "resnet": "ResNet"}).fillna(resp["arch"]),
                    depth=resp["depth"].astype(str))
    kinds = [k for k in ("ResNet", "plain") if k in set(d["net"])] + sorted(set(d["net"]) - {"ResNet", "plain"})
    kw = dict(hue="depth", hue_order=sorted(d["depth"].unique(), key=int), style="net", style_order=kinds,
              dashes={k: "" if k != "plain" else (4, 2) for k in kinds}, units="seed", estimator=None, lw=1)
    fig, axes = plt.subplots(2, 1, figsize=(6, 5.5))
    ylabel = "std of BN output\n(per channel, mean over channels)"
    sns.lineplot(data=d, x="layer", y="std", ax=axes[0], **kw)
    axes[0].set(xlabel="layer index (original)", ylabel=ylabel)
    sns.lineplot(data=d, x="rank", y="std", ax=axes[1], legend=False, **kw)
    axes[1].set(xlabel="layer index (sorted by magnitude)", ylabel=ylabel)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:  # layers are counted: no ticks at 2.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return note(fig, "one line per seed")


def imagenet_figure(table: pd.DataFrame) -> Figure:
    """GMACs per ImageNet ResNet: both stride placements and the paper's numbers."""
    set_style()
    cols = [c for c in table.columns if c.startswith("GMACs")]
    long = table.melt(id_vars="depth", value_vars=cols, var_name="count", value_name="GMACs")
    g = sns.catplot(data=long, x="depth", y="GMACs", hue="count", kind="bar", errorbar=None, height=3.2, aspect=1.8)
    return g.figure


def lesion_figure(lesion: pd.DataFrame) -> Figure:
    """Veit et al. Fig. 3: test error after deleting each single block (mean over seeds); dashed lines: no
    deletion; a gap where a plain net cannot lose a block (it changes the shape)."""
    if lesion.empty:
        return no_data_figure("single-block deletion")
    set_style()
    d = lesion.assign(**{"test error (%)": 100 * lesion["err"].astype(float)})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, (net, g) in enumerate(d.groupby("net", sort=False)):
        colour = sns.color_palette(PALETTE)[i % 10]
        per_block = g.groupby("block")["test error (%)"].mean()  # all-NaN blocks stay NaN: a gap in the line
        ax.plot(per_block.index, per_block.to_numpy(), marker="o", color=colour, label=net)
        base = 100 * g.drop_duplicates("seed")["base_err"].astype(float).mean() if "seed" in g else 100 * g["base_err"].iloc[0]
        ax.axhline(base, ls="--", lw=1, color=colour)
    ax.axhline(CHANCE_ERR, ls=":", lw=1, color="0.4")
    for b in d.loc[d["changes_shape"].astype(bool), "block"].unique():
        ax.axvline(b, color="0.85", lw=3, zorder=0)
    ax.set(xlabel="deleted block, from 0 (grey: blocks that change the shape)", ylabel="test error (%)", ylim=(0, 100))
    ax.legend(frameon=False)
    return note(fig, "dashed: the intact net; dotted: chance (90%); mean over seeds")


def deletion_figure(delete: pd.DataFrame, reorder: pd.DataFrame) -> Figure:
    """Veit et al. Fig. 5: error vs number of deleted blocks (a), and vs the Kendall tau of the reordered
    blocks against their order (b; one point per random draw, 1 = the original order, read right to left)."""
    if delete.empty and reorder.empty:
        return no_data_figure("deleting and reordering blocks")
    set_style()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    if not delete.empty:
        sns.lineplot(data=delete.assign(err100=100 * delete["err"]), x="k", y="err100", hue="net", marker="o",
                     errorbar="sd", ax=axes[0])
        axes[0].set(xlabel="blocks deleted", ylabel="test error (%)")
    if not reorder.empty:
        r = reorder.assign(err100=100 * reorder["err"])
        x = "kendall_tau" if "kendall_tau" in r else "k"  # a table from before the column: pairs swapped
        sns.scatterplot(data=r, x=x, y="err100", hue="net", alpha=0.7, ax=axes[1], legend=delete.empty)
        axes[1].set(xlabel="Kendall tau of the block order" if x == "kendall_tau" else "pairs of blocks swapped",
                    ylabel="test error (%)")
        if x == "kendall_tau":
            axes[1].invert_xaxis()  # as Veit et al.: more reordering to the right
    if not delete.empty and (delete["depth"] == 110).any():  # the paper's reading point, for a 110-layer net
        axes[0].plot([10], [20], "x", color="k", label="Veit et al. 2016 (≈)")
        axes[0].legend(title="net", frameon=False)
    return note(fig, "left: band ±1 sd over the distinct random draws of each k (seeds pooled); right: one point "
                     "per random reordering (seeds pooled)")


def paths_figure(paths: pd.DataFrame, gradient: pd.DataFrame, effective: pd.DataFrame) -> Figure:
    """Veit et al. Fig. 6: path-length distribution, gradient per path, total gradient per length."""
    if gradient.empty:
        return no_data_figure("path lengths and their gradient")
    set_style()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    p = paths.assign(share=paths["share"].astype(float))
    sns.lineplot(data=p, x="k", y="share", hue="net", errorbar=None, ax=axes[0])  # exact: C(m,k) / 2^m
    axes[0].set(xlabel="path length", ylabel="share of paths")
    per_run = [c for c in ("net", "seed", "k") if c in gradient]
    g = gradient.drop_duplicates(per_run)  # one total per run and length; the line is the mean over seeds
    # the middle half of the sampled paths: a mean ± 1 sd band of skewed norms reaches below zero, off a log axis
    sns.lineplot(data=gradient, x="k", y="grad_norm", hue="net", errorbar=("pi", 50), ax=axes[1], legend=False)
    axes[1].set(xlabel="path length", ylabel="input-gradient norm of one path", yscale="log")
    sns.lineplot(data=g, x="k", y="total", hue="net", errorbar=t_interval, ax=axes[2], legend=False)
    colour = {net: sns.color_palette(PALETTE)[i % 10] for i, net in enumerate(pd.unique(g["net"]))}
    for e in effective.to_dict("records"):  # one span per run
        axes[2].axvspan(e["effective_from"], e["effective_to"], alpha=0.15, color=colour.get(e["net"], "0.5"))
    axes[2].set(xlabel="path length (shaded: effective, at least 90% of the gradient)",
                ylabel="total gradient\n(mean norm × C(m, k) paths)")
    fig.tight_layout()
    return note(fig, f"middle: mean over the sampled paths of each length, band their middle 50% (25th-75th "
                     f"percentile); right: band {CI_BAND}")
