"""results/<preset>/RESULTS.md: every notebook's findings on one page, written from the tables beside it.

Numbers typed into a README go stale as runs come in; this page is rebuilt by `report` and `make reproduce`
from the same CSVs the notebooks wrote, so what it says is what the runs measured. A table not there yet
(no run it asks for stored) is named as missing, never filled in.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd

from .claims import TRAIN_ERR_MEANS, read_table, scope_note
from .runs import JOINED, atomic_write_text, results_dir

# the error columns every run table has, each shown as "mean ± CI" (markdown_table joins it with its _ci95)
MEAN_CI = (("train_err_%", "train error %"), ("test_err_%", "test error %"))


def _cell(v: object, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _mean_ci(row: pd.Series, col: str) -> str:
    """'12.25 ± 1.78' (95% CI over seeds), or the mean alone where one run gives no CI."""
    m, ci = row.get(col), row.get(col.replace("_%", "_ci95"))
    if m is None or pd.isna(m):
        return "–"
    return f"{m:.2f} ± {ci:.2f}" if ci is not None and not pd.isna(ci) else f"{m:.2f}"


def markdown_table(df: pd.DataFrame, columns: list[tuple[str, str]]) -> str:
    """A markdown table of `columns` ((column, header); a column ending in _% also shows its _ci95)."""
    cols = [(c, h) for c, h in columns if c in df.columns]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [_mean_ci(r, c) if c.endswith("_%") and c.replace("_%", "_ci95") in df.columns else _cell(r[c])
                 for c, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(base: Path, notebook: str, name: str, caption: str) -> list[str]:
    p = base / notebook / f"{name}.png"
    return [f"![{caption}]({notebook}/{name}.png)", ""] if p.exists() else []


# runs: the finished ones the means are over; diverged: runs not in them (their last error is that of NaN logits)
RUN_COLUMNS = [("runs", "runs"), ("diverged", "diverged"), *MEAN_CI, ("params", "params"),
               ("wall_min", "wall min/run"), ("packed", "packed"), ("device", "device")]


def _section(base: Path, title: str, notebook: str, table: str, columns: list[tuple[str, str]],
             intro: str = "", figures: tuple[tuple[str, str], ...] = (),
             derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> list[str]:
    out = [f"## {title}", ""]
    if intro:
        out += [intro, ""]
    df = read_table(base, notebook, table)
    if df is None:
        out += [f"No `{notebook}/{table}.csv` rows yet: none of the runs its last execution asked for (the "
                f"parameters in `executed/{notebook}.ipynb`) is stored (or analysed) in this preset.", ""]
        return out
    out += [markdown_table(df if derive is None else derive(df), columns), ""]
    for name, caption in figures:
        out += _figure(base, notebook, name, caption)
    return out


PROVENANCE_TABLES = [("01_degradation", "table"), ("02_depth", "table"), ("03_shortcut_ablations", "table"),
                     ("05_thousand_layers", "table"), ("08_fast_path_fidelity", "table")]


def _provenance(base: Path) -> list[str]:
    """The devices and CIFAR-10 copies (sha256 prefixes) the tables' runs used, from the tables' own columns,
    so the page says the same wherever it is rebuilt."""
    devices, copies, pixels, fills = set(), set(), set(), set()
    no_fill = False  # a table with rows written before the pad_fill column
    for notebook, table in PROVENANCE_TABLES:
        df = read_table(base, notebook, table)
        for col, sep, into in (("device", JOINED, devices), ("dataset", ",", copies), ("pixels", ",", pixels),
                               ("pad_fill", ",", fills)):
            if df is not None and col in df:  # split as summarize joins them
                into.update(x.strip() for v in df[col].dropna() for x in str(v).split(sep) if x.strip())
        no_fill |= df is not None and len(df) > 0 and "pad_fill" not in df
    if not devices:  # other notebooks' tables (06's) may hold finished runs: say only what these tables say
        read = ", ".join(n.split("_")[0] for n, _ in PROVENANCE_TABLES)
        return [f"Devices and CIFAR-10 copies: none recorded yet (they are read from the tables of {read}, which "
                "hold no finished run)."]
    line = (f"Devices: {'; '.join(sorted(devices))}. CIFAR-10 copies (sha256): "
            f"{', '.join(f'`{s}…`' for s in sorted(copies)) or 'not recorded in these tables (written before the column)'}.")
    if "re-encoded" in pixels:
        line += (" **Runs here trained and tested on a re-encoded (lossy, JPEG) copy of CIFAR-10, not the official "
                 "pixels**: absolute errors sit above the paper's; comparisons inside a table are fair.")
    names = {"mean": "the mean colour (the paper's)", "black": "black (torchvision's RandomCrop)"}
    if fills:
        line += f" Crops padded with {' and '.join(names.get(f, f) for f in sorted(fills))}."
    if no_fill:
        line += (" Some tables predate the crop-padding column (2026-11-30): runs trained before that date padded "
                 "their crops black and, on a GPU, were evaluated with TF32 convolutions.")
    return [line]


def _seed_range(df: pd.DataFrame) -> pd.DataFrame:
    """06's summary with `seed_range`: 'min–max' of its per-seed columns ('seed 0', ...), '–' with one seed."""
    seeds = [c for c in df.columns if str(c).startswith("seed ")]
    v = df[seeds].apply(pd.to_numeric, errors="coerce") if seeds else pd.DataFrame(index=df.index)
    return df.assign(seed_range=[f"{lo:.2f}–{hi:.2f}" if n > 1 else "–"
                                 for lo, hi, n in zip(v.min(axis=1), v.max(axis=1), v.notna().sum(axis=1))])


def build_page(preset: str, root: str | Path | None = None) -> str:
    """The page's markdown for results/<preset>/ (root: another results folder)."""
    base = (Path(root) if root is not None else results_dir()) / preset
    out = [f"# Results: the `{preset}` preset", "",
           "Written by `resnet_lab.page` from the tables in this folder (rebuilt by `resnet-lab report` and "
           "`make reproduce`; never edited by hand). In the run tables, errors are % with the Student-t 95% CI "
           "over seeds where there are several (`runs`: the finished runs the means are over; `diverged`: runs "
           f"left out of them); `–`: not measured. {TRAIN_ERR_MEANS[0].upper()}{TRAIN_ERR_MEANS[1:]}. Wall time "
           "is per run, over the runs that trained on one device (a packed run's clock ran while its neighbours "
           "stepped too).", "", *_provenance(base), ""]
    claims = read_table(base, ".", "claims")
    out += ["## Claims", ""]
    note = scope_note(preset)
    out += [note, ""] if note else []
    out += [markdown_table(claims, [("notebook", "notebook"), ("claim", "claim"), ("ours", "ours"),
                                    ("holds", "holds")]), ""] if claims is not None else ["No claims.csv yet.", ""]
    out += _section(base, "Degradation (01; He et al. 2015, Fig. 6)", "01_degradation", "table",
                    [("arch", "net"), ("depth", "depth"), *RUN_COLUMNS],
                    "He et al.: the deeper plain net has the higher training error; the deeper ResNet does not.",
                    (("degradation", "training (dashed) and test error vs iterations"),))
    out += _section(base, "Depth (02; He et al. 2015, Table 6)", "02_depth", "table",
                    [("depth", "ResNet"), ("paper_test_err_%", "paper test error %"), *RUN_COLUMNS],
                    "The paper column is He et al.'s Table 6: one run per depth, except 110, the mean of 5 runs "
                    "(6.61 ± 0.16 in the paper: mean ± SD over those 5 runs, not a 95% CI like ours).",
                    figures=(("test_error_vs_depth", "test error vs depth, paper beside"),))
    out += _section(base, "Shortcut ablations (03)", "03_shortcut_ablations", "table",
                    [("variant", "variant"), ("depth", "depth"), *RUN_COLUMNS],
                    figures=(("test_error_by_variant", "test error by variant"),))
    out += _section(base, "Unraveled ensemble (04; Veit et al. 2016): single-block lesions", "04_unraveled_ensemble",
                    "lesion_summary", [("net", "net"), ("seeds", "seeds"), ("intact_err_%", "intact %"),
                                       ("median_err_excl_downsampling_%", "median lesion % (downsampling left out)"),
                                       ("worst_blocks", "worst block"), ("worst_err_%", "its error %"),
                                       ("downsampling_err_%", "worst downsampling %")],
                    "Test error with one block's residual branch removed (each block's error averaged over seeds; "
                    "the median and the worst over the blocks that keep their shape, as the claims; blocks tied "
                    "at the worst all named).",
                    (("lesion", "test error per deleted block"), ("delete_reorder", "deleting and reordering k blocks")))
    out += _section(base, "Unraveled ensemble (04): the paths that carry the gradient", "04_unraveled_ensemble",
                    "effective", [("net", "net"), ("seed", "seed"), ("blocks", "blocks m"),
                                  ("effective_from", "effective from"), ("effective_to", "to"),
                                  ("gradient_share_%", "share of the gradient %"),
                                  ("share_of_paths_%", "share of paths %")],
                    "The shortest range of path lengths carrying at least 90% of the gradient (the share it holds "
                    "beside; among equally short ranges the one holding the most; Veit et al.: 5–17 of 54).",
                    (("path_lengths", "path lengths and gradient by path length"),))
    out += _section(base, "1000 layers (05)", "05_thousand_layers", "table",
                    [("depth", "ResNet"), ("paper_test_err_%", "paper test error %"), ("iterations", "iterations"),
                     ("eval_images", "evaluated on (images)"), ("diverged_at", "diverged at"), *RUN_COLUMNS],
                    figures=(("curves", "curves"),))
    stopped = read_table(base, "05_thousand_layers", "unfinished")
    if stopped is not None:
        out += ["Stopped part-way (not averaged into any table):", "",
                markdown_table(stopped, [(c, c) for c in stopped.columns]), ""]
    out += _section(base, "Layer responses (06; He et al. 2015, Fig. 7)", "06_layer_responses", "summary",
                    [("net", "net"), ("seeds", "seeds"), ("mean", "mean std of the BN outputs"),
                     ("seed_range", "min–max over seeds")],
                    "Per net, the std of each 3x3 layer's BN output over the test images, averaged over layers; "
                    "the mean over seeds, with the lowest and highest seed beside it.",
                    (("responses", "std per layer, in order and sorted"),), derive=_seed_range)
    out += _section(base, "Fast-path fidelity (08)", "08_fast_path_fidelity", "table",
                    [("precision", "precision"), ("loop", "loop"), *RUN_COLUMNS])
    return "\n".join(out).rstrip() + "\n"


def write_page(preset: str, root: str | Path | None = None) -> Path:
    """Write results/<preset>/RESULTS.md (atomically) and return its path."""
    path = (Path(root) if root is not None else results_dir()) / preset / "RESULTS.md"
    atomic_write_text(path, build_page(preset, root))
    return path
