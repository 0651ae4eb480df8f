"""The suite's claims, checked on the stored tables of a preset: one row per claim, holds or not.

Read from `results/<preset>/<notebook>/*.csv` (what the notebooks wrote), so the verdicts follow the
runs that happened, never a hard-coded expectation; a claim whose table is missing is `not run`.
Each row says the criterion it applies, so a reader can disagree with the criterion, not guess it.
A comparison of two means is judged against its seed noise: where the difference lies inside its
95% confidence interval (Welch, from the tables' per-cell CI and run counts) the verdict is
`within noise`, not a yes or NO that another seed could flip. A "not higher" claim is an equivalence-style
test: `yes` only where the whole interval lies at most NOT_HIGHER_MARGIN_PTS above zero, `NO` where it lies
wholly above zero. With one run on a side (or a table without CIs) the noise is not estimated: the row
says so and the verdict is `not judged`, never a yes or NO that the two means' sign alone would give.
Runs that diverged are not in a mean; the row names them.

The claims of 01, 02 and 04 are the papers' claims about converged nets: on a preset other than `paper`
the pages say that those verdicts describe early training only (`scope_note`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd

from .analysis import t975
from .runs import atomic_write_csv, atomic_write_text, read_csv, results_dir

LESION_COST_PTS = 1.0  # a residual block's deletion "costs little": under 1 point of test error
# A plain net "collapses" when one block goes: its median single-block lesion error is near chance (90% on
# CIFAR-10's 10 classes; Veit et al. Fig. 3) and well above the intact net's, so a net that never learned
# cannot pass by its error alone.
COLLAPSE_ERR = 0.8
COLLAPSE_RISE_PTS = 10.0
# "not higher": the deeper net may sit at most this far above the shallower one (points of error, upper end of
# the difference's 95% CI) for a `yes`; absence of evidence of a rise is not evidence of none
NOT_HIGHER_MARGIN_PTS = 1.0
COLUMNS = ["notebook", "claim", "criterion", "ours", "holds"]


NOISE = "within noise"
NOT_JUDGED = "not judged"
# what the tables' training error is (train.py): said wherever a verdict or figure rests on it
TRAIN_ERR_MEANS = ("training error: the running error on the augmented training mini-batches over the last "
                   "evaluation interval, not the final model evaluated on the training set")


def _row(notebook: str, claim: str, criterion: str, ours: str, holds: bool | str | None) -> dict:
    verdict = "not run" if holds is None else holds if isinstance(holds, str) else ("yes" if holds else "NO")
    return {"notebook": notebook, "claim": claim, "criterion": criterion, "ours": ours, "holds": verdict}


def ci_col(col: str) -> str:
    """'train_err_%' -> 'train_err_ci95': the column holding a mean's 95% half-width."""
    return col.removesuffix("_%") + "_ci95"


def _noise_unknown(a: pd.Series, b: pd.Series, col: str) -> str | None:
    """Why the difference of two rows has no noise estimate, or None where it has one."""
    hc = ci_col(col)
    if hc not in a or hc not in b:
        return "no CI column in the table"
    if min(int(a["runs"]), int(b["runs"])) < 2:
        return "one run on a side"
    return "no CI value" if pd.isna(a[hc]) or pd.isna(b[hc]) else None


def difference(a: pd.Series, b: pd.Series, col: str) -> tuple[float, float | None]:
    """b - a of one column of two summary rows, with the 95% half-width of that difference.

    Welch's interval, rebuilt from each row's mean, CI half-width (`<col>_ci95`, Student t over
    `runs` seeds) and run count; None where a side has a single run or the table has no CI column.
    """
    d = float(b[col]) - float(a[col])
    if _noise_unknown(a, b, col):
        return d, None
    se = [float(r[ci_col(col)]) / t975(int(r["runs"]) - 1) for r in (a, b)]  # std / sqrt(n) of each mean
    var = se[0] ** 2 + se[1] ** 2
    if var == 0:
        return d, 0.0
    dof = var ** 2 / sum(s ** 4 / (int(r["runs"]) - 1) for s, r in zip(se, (a, b)))  # Welch-Satterthwaite
    return d, t975(dof) * math.sqrt(var)


def prediction_half_width(a: pd.Series, col: str) -> float | None:
    """Half-width of the 95% prediction interval for one more run around row a's mean (Student t over its
    `runs` seeds, sd rebuilt from its CI half-width): where a single run of another kind should land if it
    is one more seed of a's. None with fewer than 2 runs or no CI value."""
    n, half = int(a["runs"]), a.get(ci_col(col))
    if n < 2 or half is None or pd.isna(half):
        return None
    sd = float(half) * math.sqrt(n) / t975(n - 1)
    return t975(n - 1) * sd * math.sqrt(1 + 1 / n)


def verdict(diff: float, half: float | None, expect: str) -> str:
    """`yes`, `NO`, `within noise` or `not judged` for a claim that b is `higher`, `lower` or `not higher` than a.

    `higher`/`lower`: yes or NO where the difference lies outside its 95% CI, `within noise` inside it.
    `not higher` (equivalence-style, margin NOT_HIGHER_MARGIN_PTS): `NO` where the whole interval lies above
    zero (b is higher), else `yes` where its upper end is at most the margin, else `within noise` (the data
    cannot rule out b higher by more than the margin). half None (no noise estimate: one run on a side, no
    CI): `not judged`, whatever the sign of the difference (two single runs' order is one draw of the noise).
    """
    allowed = ("higher", "lower", "not higher")
    if expect not in allowed:
        raise ValueError(f"expect={expect!r} is not valid: use one of {', '.join(allowed)}")
    if half is None:
        return NOT_JUDGED
    if expect == "not higher":
        return "NO" if diff - half > 0 else "yes" if diff + half <= NOT_HIGHER_MARGIN_PTS else NOISE
    sign = 1 if expect == "higher" else -1
    if sign * diff > half:
        return "yes"
    return "NO" if sign * diff < -half else NOISE


def compare_text(a: pd.Series, b: pd.Series, col: str, diff: float, half: float | None) -> str:
    """'20: 2.00 ± 0.30%, 56: 4.00 ± 0.40%; 56 - 20: +2.00 ± 0.55 points' (the numbers a verdict rests on)."""
    hc = ci_col(col)
    if half is None:
        return (f"{int(a['depth'])}: {float(a[col]):.2f}%, {int(b['depth'])}: {float(b[col]):.2f}% "
                f"(seed noise not estimated: {_noise_unknown(a, b, col)})")
    return (f"{int(a['depth'])}: {float(a[col]):.2f} ± {float(a[hc]):.2f}%, "
            f"{int(b['depth'])}: {float(b[col]):.2f} ± {float(b[hc]):.2f}%; "
            f"{int(b['depth'])} - {int(a['depth'])}: {diff:+.2f} ± {half:.2f} points")


def diverged_text(row: pd.Series, arch: str) -> str:
    """'plain-56: 2 of 3 runs diverged, not in the mean', or '' where none did (or the table has no column)."""
    dv = row.get("diverged")
    if dv is None or pd.isna(dv) or int(dv) <= 0:
        return ""
    from .experiments import NET_NAMES

    n = int(dv) + int(row["runs"])
    return f"{NET_NAMES.get(arch, arch)}-{int(row['depth'])}: {int(dv)} of {n} run{'s' if n != 1 else ''} diverged, not in the mean"


def _pair(table: pd.DataFrame, arch: str, shallow: int, deep: int) -> tuple[pd.Series, pd.Series] | None:
    t = table[(table["arch"] == arch) & (table["runs"] > 0)].drop_duplicates("depth").set_index("depth", drop=False)
    return (t.loc[shallow], t.loc[deep]) if shallow in t.index and deep in t.index else None


def _missing(table: pd.DataFrame, arch: str, depths: tuple[int, ...]) -> str:
    """Why a table that exists cannot be compared: the nets it lacks (no finished run of them)."""
    have = set(table.loc[(table["arch"] == arch) & (table["runs"] > 0), "depth"].astype(int))
    out = "no finished " + " or ".join(f"{arch}-{d}" for d in depths if d not in have) + " in the table"
    rows = table[(table["arch"] == arch) & table["depth"].isin(depths)].drop_duplicates("depth")
    dv = [t for t in (diverged_text(r, arch) for _, r in rows.iterrows()) if t]
    return out + (f" ({'; '.join(dv)})" if dv else "")


def _compared(notebook: str, claim: str, what: str, table: pd.DataFrame | None, arch: str, col: str,
              expect: str) -> dict:
    crit = f"{what}, mean over seeds; a difference inside its 95% CI (Welch) is '{NOISE}'"
    if expect == "not higher":  # `verdict`: the interval must lie wholly below the margin for a yes
        crit = (f"{what}, mean over seeds; 56 - 20 with its 95% CI (Welch): 'NO' where the CI lies wholly above 0 "
                f"(even under the margin), else 'yes' where its upper end is at most +{NOT_HIGHER_MARGIN_PTS:g} point "
                f"(the margin), else '{NOISE}'")
    crit += f"; no noise estimate (one run on a side), or a diverged run on a side: '{NOT_JUDGED}'"
    if col == "train_err_%":
        crit += f" ({TRAIN_ERR_MEANS})"
    p = None if table is None else _pair(table, arch, 20, 56)
    if p is None:
        return _row(notebook, claim, crit, "" if table is None else _missing(table, arch, (20, 56)), None)
    diff, half = difference(*p, col)
    diverged = [t for t in (diverged_text(r, arch) for r in p) if t]
    ours = "; ".join([compare_text(*p, col, diff, half), *diverged])
    # a diverged seed is a result the finished seeds' mean leaves out (the deeper net failing, or not): a person
    # reads the run, not a verdict on the survivors
    return _row(notebook, claim, crit, ours, NOT_JUDGED if diverged else verdict(diff, half, expect))


def degradation(table: pd.DataFrame | None) -> list[dict]:
    """He et al. Fig. 6: plain-56 trains worse than plain-20; ResNet-56 does not."""
    return [_compared("01_degradation", "plain-56 has higher training error than plain-20", "final training error",
                      table, "plain", "train_err_%", "higher"),
            _compared("01_degradation", "ResNet-56 has no higher training error than ResNet-20",
                      "final training error", table, "resnet", "train_err_%", "not higher")]


def depth(table: pd.DataFrame | None) -> list[dict]:
    """He et al. Table 6: the deeper ResNet-56 tests better than ResNet-20."""
    return [_compared("02_depth", "ResNet-56 has lower test error than ResNet-20", "final test error",
                      table, "resnet", "test_err_%", "lower")]


LESION_CRITERION = (f"every non-downsampling block costs < {LESION_COST_PTS:g} point (per block: mean over seeds; "
                    "median over the non-downsampling blocks, as the lesion summary)")


def _blocks(bs: list[int]) -> str:
    """'block 3', or 'blocks 0, 1' where several tie."""
    return f"block{'s' if len(bs) > 1 else ''} {', '.join(map(str, bs))}"


def lesions(lesion: pd.DataFrame | None) -> list[dict]:
    """Veit et al.: deleting one residual block costs little except at downsampling blocks; a plain net collapses.

    Each block's error is its mean over seeds and the medians are over the blocks that keep their shape
    (`experiments.lesion_by_block`, `lesion_medians`): the numbers of the lesion summary on the page."""
    from .experiments import lesion_by_block, lesion_medians, worst_blocks

    out = []
    res = None if lesion is None else lesion[lesion["arch"] != "plain"]
    if res is None or res.empty:
        out.append(_row("04_unraveled_ensemble", "single-block deletions barely hurt a ResNet (not at downsampling)",
                        LESION_CRITERION, "", None))
    else:
        deepest = res[res["depth"] == res["depth"].max()]
        for net, g in deepest.groupby("net", sort=True):  # one verdict per net, as for the plain nets below
            kept = lesion_medians(lesion_by_block(g)[0])
            cost = 100 * kept["cost"]
            out.append(_row("04_unraveled_ensemble", f"single-block deletions barely hurt {net} (not at downsampling)",
                            LESION_CRITERION,
                            f"worst: {_blocks(worst_blocks(kept, 'cost'))} +{cost.max():.2f} points; "
                            f"median +{cost.median():.2f}",
                            bool(cost.max() < LESION_COST_PTS)))
    plain = None if lesion is None else lesion[lesion["arch"] == "plain"]
    crit = (f"median lesion error >= {100 * COLLAPSE_ERR:.0f}% (chance: 90%) and >= {COLLAPSE_RISE_PTS:g} points "
            "above the intact net's (per block: mean over seeds; median over the blocks that can be removed)")
    if plain is None or plain.empty:
        out.append(_row("04_unraveled_ensemble", "a plain net collapses when one layer block is deleted", crit, "",
                        None))
        return out
    deepest = plain[plain["depth"] == plain["depth"].max()]
    for net, g in deepest.groupby("net", sort=True):
        per_block, base = lesion_by_block(g)  # intact: every seed's, averaged (the lesion figure's dashed line)
        med = float(lesion_medians(per_block)["err"].median())
        out.append(_row("04_unraveled_ensemble", f"{net} collapses when one block is deleted", crit,
                        f"median {100 * med:.1f}% (intact {100 * base:.1f}%, +{100 * (med - base):.1f} points)",
                        med >= COLLAPSE_ERR and 100 * (med - base) >= COLLAPSE_RISE_PTS))
    return out


def effective_paths(effective: pd.DataFrame | None) -> list[dict]:
    """Veit et al.: the gradient comes from paths much shorter than the net (5-17 of 54 blocks)."""
    claim = "the gradient comes from paths much shorter than the net"
    crit = ("upper end of the effective range (the shortest range of path lengths holding at least 90% of the "
            "gradient) below the mean path length m/2")
    if effective is None or effective.empty:
        return [_row("04_unraveled_ensemble", claim, crit, "", None)]
    e = effective[effective["depth"] == effective["depth"].max()]
    rows = []
    for net, g in e.groupby("net", sort=True):  # one verdict per net (ResNet-110 and pre-act-110, say)
        hi, m = int(g["effective_to"].max()), int(g["blocks"].iloc[0])
        ranges = ", ".join(sorted({f"{int(a)}-{int(b)}" for a, b in zip(g["effective_from"], g["effective_to"])}))
        held = ""
        if "gradient_share_%" in g and g["gradient_share_%"].notna().any():  # tables from before the column: not said
            held = "; holding " + ", ".join(f"{v:.1f}%" for v in g["gradient_share_%"].dropna()) + " of the gradient"
        rows.append(_row("04_unraveled_ensemble", f"{claim} ({net})", crit,
                         f"effective {ranges} of {m} blocks (m/2 = {m / 2:g}){held}", hi < m / 2))
    return rows


def fidelity(table: pd.DataFrame | None) -> list[dict]:
    """Issue #8: the fast step (bf16, CUDA graph) learns what the reference loop (fp32, eager) learns."""
    from .experiments import fidelity_verdict

    nb, claim = "08_fast_path_fidelity", "the fast step reaches the reference loop's test error"
    crit = ("final test error; one reference run: inside the fast runs' 95% prediction interval for one more "
            "seed; more: the difference inside its 95% CI (Welch)")
    if table is None:
        return [_row(nb, claim, crit, "", None)]
    v = fidelity_verdict(table).iloc[0]
    ours = "; ".join(f"{k} {v[k]}" for k in ("fast", "reference", "reference - fast") if v[k])
    said = v["holds here"]
    return [_row(nb, claim, crit, ours, True if said == "yes" else False if said == "NO" else said)]


def read_table(base: Path, notebook: str, name: str) -> pd.DataFrame | None:
    """The table, or None where it is missing or holds no row (a notebook run before any of its nets were)."""
    p = base / notebook / f"{name}.csv"
    try:
        df = read_csv(p)  # the floats the notebook wrote, bit for bit, under pandas 2 as under 3
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    return df if len(df) else None


CHECKS: list[tuple[Callable[[pd.DataFrame | None], list[dict]], str, str]] = [
    (degradation, "01_degradation", "table"),
    (depth, "02_depth", "table"),
    (lesions, "04_unraveled_ensemble", "lesion"),
    (effective_paths, "04_unraveled_ensemble", "effective"),
    (fidelity, "08_fast_path_fidelity", "table"),
]


def scope_note(preset: str) -> str | None:
    """For a preset other than `paper`: the line saying which claims are about converged nets and that this
    preset's nets are not (None for `paper`)."""
    if preset == "paper":
        return None
    from .config import PRESETS, SPLIT_IMAGES

    p = PRESETS.get(preset)
    trained = ""
    if p is not None:
        images = p.get("train_subset") or SPLIT_IMAGES[p.get("split", "full")][0]
        epochs = p["iterations"] * p["batch_size"] / images
        trained = f" ({p['iterations']:,} iterations of batch {p['batch_size']}, {epochs:.2g} epoch)"
    return (f"**Scope: the `{preset}` nets are not converged{trained}.** The claims of 01, 02 and 04 (degradation, "
            "depth, single-block lesions, effective paths) are the papers' claims about converged nets (the `paper` "
            "preset's 64,000 iterations): here those verdicts describe early training only, not whether the papers' "
            "claims hold. 08 compares two loops on the same schedule, which any preset can judge.")


def check(preset: str, root: str | Path | None = None) -> pd.DataFrame:
    """Every claim of the suite on results/<preset>/'s tables (root: another results folder); writes
    claims.csv and claims.md beside them."""
    base = (Path(root) if root is not None else results_dir()) / preset
    rows = [r for fn, nb, name in CHECKS for r in fn(read_table(base, nb, name))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(table, base / "claims.csv")
    atomic_write_text(base / "claims.md", _markdown(table, preset))
    return table


def _markdown(table: pd.DataFrame, preset: str) -> str:
    lines = [f"# Claims checked on the `{preset}` runs", "",
             "Computed by `resnet_lab.claims` from the tables in this folder; `NO` means our runs do not show it,",
             f"`{NOISE}` that the difference is inside its 95% CI over seeds (another seed could flip it), "
             f"`{NOT_JUDGED}` that there is no noise estimate (one run on a side): the `ours` column says why. A",
             f"'no higher' claim needs the difference's whole 95% CI at most {NOT_HIGHER_MARGIN_PTS:g} point above "
             "zero for a `yes`: its criterion says so."]
    note = scope_note(preset)
    lines += ["", note] if note else []
    lines += ["", "| notebook | claim | criterion | ours | holds |", "|---|---|---|---|---|"]
    lines += [f"| {r.notebook} | {r.claim} | {r.criterion} | {r.ours} | {r.holds} |" for r in table.itertuples()]
    return "\n".join(lines) + "\n"
