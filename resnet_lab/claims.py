"""The suite's claims, checked on the stored tables of a preset: one row per claim, holds or not.

Read from `results/<preset>/<notebook>/*.csv` (what the notebooks wrote), so the verdicts follow the
runs that happened, never a hard-coded expectation; a claim whose table is missing is `not run`.
Each row says the criterion it applies, so a reader can disagree with the criterion, not guess it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from .runs import atomic_write_csv, atomic_write_text, results_dir

LESION_COST_PTS = 1.0  # a residual block's deletion "costs little": under 1 point of test error
COLLAPSE_ERR = 0.5  # a plain net "collapses": its median single-block lesion error is above 50%
COLUMNS = ["notebook", "claim", "criterion", "ours", "holds"]


def _row(notebook: str, claim: str, criterion: str, ours: str, holds: bool | None) -> dict:
    return {"notebook": notebook, "claim": claim, "criterion": criterion, "ours": ours,
            "holds": "not run" if holds is None else ("yes" if holds else "NO")}


def _pair(table: pd.DataFrame, arch: str, shallow: int, deep: int, col: str) -> tuple[float, float] | None:
    t = table[(table["arch"] == arch) & (table["runs"] > 0)].set_index("depth")[col]
    return (float(t[shallow]), float(t[deep])) if shallow in t.index and deep in t.index else None


def degradation(table: pd.DataFrame | None) -> list[dict]:
    """He et al. Fig. 6: plain-56 trains worse than plain-20; ResNet-56 does not."""
    out = []
    for arch, claim, worse in (("plain", "plain-56 has higher training error than plain-20", True),
                               ("resnet", "ResNet-56 has no higher training error than ResNet-20", False)):
        p = None if table is None else _pair(table, arch, 20, 56, "train_err_%")
        ours = "" if p is None else f"20: {p[0]:.2f}%, 56: {p[1]:.2f}%"
        holds = None if p is None else (p[1] > p[0]) == worse
        out.append(_row("01_degradation", claim, "final training error, mean over seeds", ours, holds))
    return out


def depth(table: pd.DataFrame | None) -> list[dict]:
    """He et al. Table 6: the deeper ResNet-56 tests better than ResNet-20."""
    p = None if table is None else _pair(table, "resnet", 20, 56, "test_err_%")
    return [_row("02_depth", "ResNet-56 has lower test error than ResNet-20", "final test error, mean over seeds",
                 "" if p is None else f"20: {p[0]:.2f}%, 56: {p[1]:.2f}%", None if p is None else p[1] < p[0])]


def lesions(lesion: pd.DataFrame | None) -> list[dict]:
    """Veit et al.: deleting one residual block costs little except at downsampling blocks; a plain net collapses."""
    out = []
    res = None if lesion is None else lesion[lesion["arch"] != "plain"]
    if res is None or res.empty:
        out.append(_row("04_unraveled_ensemble", "single-block deletions barely hurt a ResNet (not at downsampling)",
                        f"every non-downsampling block costs < {LESION_COST_PTS:g} point", "", None))
    else:
        deepest = res[res["depth"] == res["depth"].max()]
        kept = deepest[~deepest["changes_shape"].astype(bool)]
        cost = 100 * (kept["err"].astype(float) - kept["base_err"].astype(float))
        worst = kept.loc[cost.idxmax()]
        out.append(_row("04_unraveled_ensemble",
                        f"single-block deletions barely hurt {worst['net']} (not at downsampling)",
                        f"every non-downsampling block costs < {LESION_COST_PTS:g} point",
                        f"worst: block {int(worst['block'])} +{cost.max():.2f} points; median +{cost.median():.2f}",
                        bool(cost.max() < LESION_COST_PTS)))
    plain = None if lesion is None else lesion[lesion["arch"] == "plain"]
    if plain is None or plain.empty:
        out.append(_row("04_unraveled_ensemble", "a plain net collapses when one layer block is deleted",
                        f"median lesion error > {100 * COLLAPSE_ERR:.0f}%", "", None))
    else:
        deepest = plain[plain["depth"] == plain["depth"].max()]
        med = float(deepest["err"].astype(float).median())
        out.append(_row("04_unraveled_ensemble", f"{deepest['net'].iloc[0]} collapses when one block is deleted",
                        f"median lesion error > {100 * COLLAPSE_ERR:.0f}%",
                        f"median {100 * med:.1f}% (intact {100 * float(deepest['base_err'].iloc[0]):.1f}%)",
                        med > COLLAPSE_ERR))
    return out


def effective_paths(effective: pd.DataFrame | None) -> list[dict]:
    """Veit et al.: the gradient comes from paths much shorter than the net (5-17 of 54 blocks)."""
    claim = "the gradient comes from paths much shorter than the net"
    crit = "upper end of the effective range (90% of the gradient) below the mean path length m/2"
    if effective is None or effective.empty:
        return [_row("04_unraveled_ensemble", claim, crit, "", None)]
    e = effective[effective["depth"] == effective["depth"].max()]
    hi, m = int(e["effective_to"].max()), int(e["blocks"].iloc[0])
    ranges = ", ".join(sorted({f"{int(a)}-{int(b)}" for a, b in zip(e["effective_from"], e["effective_to"])}))
    return [_row("04_unraveled_ensemble", f"{claim} ({e['net'].iloc[0]})", crit,
                 f"effective {ranges} of {m} blocks (m/2 = {m / 2:g})", hi < m / 2)]


def _read(base: Path, notebook: str, name: str) -> pd.DataFrame | None:
    """The table, or None where it is missing or holds no row (a notebook run before any of its nets were)."""
    p = base / notebook / f"{name}.csv"
    try:
        df = pd.read_csv(p)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    return df if len(df) else None


CHECKS: list[tuple[Callable[[pd.DataFrame | None], list[dict]], str, str]] = [
    (degradation, "01_degradation", "table"),
    (depth, "02_depth", "table"),
    (lesions, "04_unraveled_ensemble", "lesion"),
    (effective_paths, "04_unraveled_ensemble", "effective"),
]


def check(preset: str, root: str | Path | None = None) -> pd.DataFrame:
    """Every claim of the suite on results/<preset>/'s tables (root: another results folder); writes
    claims.csv and claims.md beside them."""
    base = (Path(root) if root is not None else results_dir()) / preset
    rows = [r for fn, nb, name in CHECKS for r in fn(_read(base, nb, name))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(table, base / "claims.csv")
    atomic_write_text(base / "claims.md", _markdown(table, preset))
    return table


def _markdown(table: pd.DataFrame, preset: str) -> str:
    lines = [f"# Claims checked on the `{preset}` runs", "",
             "Computed by `resnet_lab.claims` from the tables in this folder; `NO` means our runs do not show it.",
             "", "| notebook | claim | criterion | ours | holds |", "|---|---|---|---|---|"]
    lines += [f"| {r.notebook} | {r.claim} | {r.criterion} | {r.ours} | {r.holds} |" for r in table.itertuples()]
    return "\n".join(lines) + "\n"
