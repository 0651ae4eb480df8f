"""What each notebook runs: its grid of configs, and its tables from the run store.

A notebook (or `resnet-lab report`) calls `configs_*` to name its runs, `train_all` to make sure they
exist (or `collect` to read them without training), then the table functions here and the figure
functions in `plots`.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pandas as pd
import torch

from .analysis import summarize
from .config import GATED_ARCHS, SPLIT_IMAGES, RunConfig, check_preset, make_config
from .data import balanced_subset, load_cifar10, resolve_source
from .fast import exact_fp32
from .runs import RunDir, atomic_write_csv, load_metrics, load_runs, results_dir
from .train import RunRecord, check_pack, check_pack_mb, deadline_after, resolve_device, train_many

log = logging.getLogger(__name__)


def check_grid(name: str, values: list, allowed: Iterable | None = None, positive: bool = False) -> list:
    """Grid parameters fail before any training: empty lists, bad values, unknown names, a value twice (it would
    train once and be listed once: a grid refuses it, `sweep.load_grid`, and so does a notebook)."""
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"{name}={values!r} is not valid: give a non-empty list")
    for i, v in enumerate(values):
        if v in values[:i]:
            raise ValueError(f"{name} lists {v!r} twice: each value once")
        if allowed is not None and v not in allowed:
            raise ValueError(f"{name} contains {v!r}: allowed are {list(allowed)}")
        if positive and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} contains {v!r}: use integers >= 0")
    return list(values)


# A notebook's counts (04's analysis settings, 06's images, 07's timing) and their upper bound (the test set's
# 10,000 images; None: none): a bad one would pass a type check and fail, or run for minutes on nonsense, or
# quietly measure something else (max_images=-5 took all but 5 images) deep inside the notebook. The notebook's
# functions check them under its parameter names, and `sweep.check_params` before any point runs. Keyed by name
# across notebooks: a new notebook's count parameter is checked only once its name is here.
COUNT_PARAMS = {"draws": None, "grad_samples": None, "grad_batch": None, "eval_images": 10_000,
                "max_images": 10_000, "batch_size": None, "repeats": None}


def check_count(name: str, value: Any) -> int:
    """A positive integer within COUNT_PARAMS[name]'s bound, or a ValueError naming the parameter."""
    most = COUNT_PARAMS[name]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or (most is not None and value > most):
        bound = f" up to {most:,} (the test set)" if most is not None else ""
        raise ValueError(f"{name}={value!r} is not valid: use a positive integer{bound}")
    return value


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


def unique_runs(cfgs: Iterable[RunConfig]) -> list[RunConfig]:
    """Each run once, where it first appears: grids and notebooks share runs (06 reuses 01's), and copies
    may differ in speed-only fields (checkpointing), which the first one's caller chose."""
    first: dict[str, RunConfig] = {}
    for c in cfgs:
        first.setdefault(c.hash, c)
    return list(first.values())


def with_dataset(cfgs: Iterable[RunConfig], source: str | os.PathLike | None = None) -> list[RunConfig]:
    ds = dataset_id(source)
    return [c if c.dataset else dataclasses.replace(c, dataset=ds) for c in cfgs]


# -- running and reading ---------------------------------------------------------------------------
PACK_CUDA = 4  # small nets packed per GPU by default (`resnet-lab bench` measures 1/2/4/8)
LONE_DEPTH = 200  # deeper nets train alone: one already fills the GPU (and its memory)


def pack_size(device: str | torch.device | None = None) -> int:
    """Runs packed per device: $RESNET_LAB_PACK, else PACK_CUDA on a GPU and 1 on the CPU."""
    env = os.environ.get("RESNET_LAB_PACK")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"RESNET_LAB_PACK={env!r} is not valid: use an integer >= 1")
        return int(env)
    return PACK_CUDA if resolve_device(device).type == "cuda" else 1


def group_seeds() -> bool:
    """$RESNET_LAB_GROUP: 1 trains the seeds of one config as one grouped net (see `train_many`)."""
    env = os.environ.get("RESNET_LAB_GROUP", "0")
    if env not in ("0", "1"):
        raise ValueError(f"RESNET_LAB_GROUP={env!r} is not valid: use 0 or 1")
    return env == "1"


def train_all(cfgs: Iterable[RunConfig], device: str | None = None, root: str | os.PathLike | None = None,
              source: str | os.PathLike | None = None, pack: int | None = None, group: bool | None = None,
              **kw: Any) -> list[RunRecord | None]:
    """Train every config not yet in the store, small nets `pack` at a time on a GPU.

    A failure is logged and stored in its run folder; the others go on (its entry is None).
    group (default $RESNET_LAB_GROUP, off): seeds of one config train as one grouped net.
    time_budget_s (in kw) is one budget for all of them, small nets and lone deep ones alike; pack_mb (in kw):
    MiB of checkpoints a pack may hold (`train.pack_chunks`).
    """
    deadline = deadline_after(kw.pop("time_budget_s", None))  # checked before the data loads, as are these
    dev = resolve_device(device)
    pack = pack_size(dev) if pack is None else check_pack(pack)
    check_pack_mb(kw.get("pack_mb"))
    data = load_cifar10(source)
    cfgs = list(cfgs)
    group = group_seeds() if group is None else group
    out: dict[int, RunRecord | None] = {}
    lone = [i for i, c in enumerate(cfgs) if c.depth > LONE_DEPTH]
    small = [i for i, c in enumerate(cfgs) if c.depth <= LONE_DEPTH]
    for ix, p in ((small, pack), (lone, 1)):
        if not ix:
            continue
        try:
            recs = train_many([cfgs[i] for i in ix], root=root, device=dev, data=data, pack=p, group=group,
                              deadline=deadline, **kw)
        except Exception as e:  # e.g. the run store cannot be written: say so, the other group still goes
            log.error("training %d run(s) failed: %s", len(ix), e)
            recs = [None] * len(ix)
        out.update(zip(ix, recs))
    if torch.cuda.is_available():
        gc.collect()  # whatever of the packs a reference cycle still holds, before the cache is handed back
        torch.cuda.empty_cache()
    return [out[i] for i in range(len(cfgs))]


def collect(cfgs: Iterable[RunConfig], root: str | os.PathLike | None = None,
            source: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[RunConfig]]:
    """(runs, curves, missing) for these configs, read from the store: nothing is trained.

    curves are those of the runs the tables average (done) only: a run imported half-way through its
    schedule would pull a mean curve down where it stops, and a diverged one (counted, not averaged, in
    the tables; `runs_note` names it) up to chance. missing: configs with no finished (done or diverged)
    run, which `train_all` would train.
    """
    cfgs = with_dataset(cfgs, source)
    hashes = [c.hash for c in cfgs]
    runs = load_runs(root)
    runs = runs[runs["hash"].isin(hashes)].reset_index(drop=True)
    have = set(runs.loc[runs["status"].isin(["done", "diverged"]), "hash"])
    curves = load_metrics(root, hash=sorted(runs.loc[runs["status"] == "done", "hash"]))  # [] keeps the columns
    return runs, curves, [c for c in cfgs if c.hash not in have]


def store_status(cfgs: Iterable[RunConfig], runs: pd.DataFrame, missing: Iterable[RunConfig]) -> str:
    """What a notebook's top says of its runs (from `collect`): how many are finished, which stopped
    part-way and where, which failed, which are not trained yet (by name, with their seeds)."""
    cfgs, missing = list({c.hash: c for c in cfgs}.values()), list({c.hash: c for c in missing}.values())
    info = {r["hash"]: r for r in runs.to_dict("records")}
    stopped, failed, absent = [], [], {}
    for c in missing:
        r = info.get(c.hash, {})
        steps = pd.to_numeric(r.get("steps_done"), errors="coerce")
        steps = 0 if pd.isna(steps) else int(steps)
        if r.get("status") == "failed":
            failed.append(f"{c.name} seed {c.seed}")
        elif steps > 0:
            stopped.append(f"{c.name} seed {c.seed} ({steps:,} of {c.iterations:,} iterations)")
        else:
            absent.setdefault(c.name, []).append(c.seed)
    parts = [f"{len(cfgs) - len(missing)} of {len(cfgs)} runs finished"]
    if stopped:
        parts.append("stopped part-way (or training now): " + ", ".join(stopped))
    if failed:
        parts.append("failed (summary.json says why): " + ", ".join(failed))
    if absent:
        parts.append("not trained yet: " + ", ".join(
            f"{n} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, sorted(ss)))})" for n, ss in absent.items()))
    return "; ".join(parts)


UNFINISHED_COLUMNS = ["name", "depth", "seed", "steps_done", "iterations", "done_%", "train_err_%", "test_err_%",
                      "wall_min", "device"]


def stopped_part_way(runs: pd.DataFrame) -> pd.Series:
    """Which runs stopped part-way through their schedule (a checkpoint's worth of steps, not finished)."""
    return (runs["status"] == "running") & (pd.to_numeric(runs["steps_done"], errors="coerce").fillna(0) > 0)


def unfinished(runs: pd.DataFrame, root: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, curves) of the runs in `runs` that stopped part-way through their schedule, each curve's
    `depth` a label saying where it stands. ResNet-1202's schedule can outlast a GPU lease, and its
    checkpoint is too big to go on to the next one, so what it reached is shown for what it is: beside
    the finished runs, never in their tables or means. Errors are those of its last evaluation."""
    u = runs[stopped_part_way(runs)]
    if u.empty:
        return pd.DataFrame(columns=UNFINISHED_COLUMNS), load_metrics(root, hash=[])
    u = u.sort_values(["depth", "seed"])
    steps, iters = u["steps_done"].astype(int), u["iterations"].astype(int)
    table = pd.DataFrame({"name": u["name"], "depth": u["depth"], "seed": u["seed"], "steps_done": steps,
                          "iterations": iters, "done_%": 100 * steps / iters,
                          "train_err_%": 100 * pd.to_numeric(u["final_train_err"], errors="coerce"),
                          "test_err_%": 100 * pd.to_numeric(u["final_test_err"], errors="coerce"),
                          "wall_min": pd.to_numeric(u["wall_seconds"], errors="coerce") / 60,
                          "device": u["device"]}).reset_index(drop=True)
    label = {h: f"{d} (unfinished: {s:,} of {i:,} it.)" for h, d, s, i in zip(u["hash"], u["depth"], steps, iters)}
    curves = load_metrics(root, hash=list(u["hash"]))
    # up to its checkpoint: a sitting killed after evaluating further left rows that the resume will redo
    curves = curves[curves["step"] <= curves["hash"].map(dict(zip(u["hash"], steps)))]
    return table, curves.assign(depth=curves["hash"].map(label))


SCRATCH = "scratch"  # results/<preset>/scratch/<notebook>/: the tables and figures of a notebook run by hand


def output_dir(preset: str, notebook: str) -> Path:
    """Where a notebook writes its tables and figures, created: $RESNET_LAB_OUTPUT_DIR where set (`report` and
    `make reproduce` set the committed results/<preset>/<notebook>/, which RESULTS.md and the claims are read
    from; `sweep` a point's folder beside its executed notebook), else results/<preset>/scratch/<notebook>/
    (git-ignored): a notebook explored by hand never writes over the tables of the executed notebooks."""
    from .sweep import OUTPUT_VAR

    check_preset(preset)  # 07 trains nothing, so no config checks its preset: a typo made results/<typo>/
    d = Path(os.environ[OUTPUT_VAR]) if os.environ.get(OUTPUT_VAR) else results_dir() / preset / SCRATCH / notebook
    d.mkdir(parents=True, exist_ok=True)
    return d


TRAIN_IMAGES = {split: n for split, (n, _) in SPLIT_IMAGES.items()}
EVAL_IMAGES = {split: (n, "test" if split == "full" else "validation") for split, (_, n) in SPLIT_IMAGES.items()}


def eval_images(run: Mapping[str, Any]) -> int:
    """How many images a run's errors are over (a row of `collect`/`load_runs`): its eval_subset, else its split's."""
    ev = run.get("eval_subset")
    return EVAL_IMAGES[run["split"]][0] if ev is None or pd.isna(ev) else int(ev)


def _epochs(e: float) -> str:
    return f"{e:.2g} epoch{'' if e <= 1 else 's'}" if e < 10 else f"{e:.0f} epochs"


def runs_note(runs: pd.DataFrame, stopped: bool = False, measured: str | None = None) -> str:
    """One line naming what a figure's runs are (preset, each schedule, seeds, evaluation images), so a
    figure read on its own, as a committed PNG, says whether it shows 0.4 epoch or the paper's 164.
    The finished runs, which the figures draw, and the diverged ones they leave out, by name; `stopped`:
    also the runs stopped part-way that 05 draws, each with the step it stopped at. `measured` replaces the
    runs' evaluation images for a figure measured on other images (04's lesions, 06's responses)."""
    d, diverged = runs, runs.iloc[:0]
    if "status" in runs:
        drawn = runs["status"] == "done"
        if stopped:
            drawn |= stopped_part_way(runs)
        d, diverged = runs[drawn], runs[runs["status"] == "diverged"]
    if d.empty and diverged.empty:
        return ""
    left_out = ""
    if not diverged.empty:
        names = [f"{n} seed {int(s)}" for n, s in sorted(zip(diverged["name"], diverged["seed"]))]
        left_out = f"; diverged, not drawn: {', '.join(names)}"
    if d.empty:
        return left_out[2:]
    schedules: dict[tuple[int, int, int, bool, str, int], set[str]] = {}
    part_way = stopped_part_way(d) if stopped and "status" in d else pd.Series(False, index=d.index)
    for r, cut in zip(d.to_dict("records"), part_way):
        sub = r.get("train_subset")
        n = TRAIN_IMAGES[r["split"]] if sub is None or pd.isna(sub) else int(sub)
        evals = f"{eval_images(r):,} {EVAL_IMAGES[r['split']][1]} images"
        at = int(r["steps_done"]) if cut else 0  # a run stopped part-way is its own schedule: where it stands
        key = (int(r["iterations"]), int(r["batch_size"]), n, not (sub is None or pd.isna(sub)), evals, at)
        schedules.setdefault(key, set()).add(r["name"])
    # one evaluation for all is said once at the end; otherwise each schedule says its own, so a 100-image
    # plumbing check is not read as measured on the 1,000 images of the nets beside it
    per_schedule = measured is None and len({k[4] for k in schedules}) > 1
    parts = []
    for (it, bs, n, subset, evals, at), names in sorted(schedules.items(), reverse=True):
        # an epoch of a subset is not an epoch of CIFAR-10: 6 steps of 8 on 512 images are 0.094 of that subset
        of = f" of a {n:,}-image subset" if subset else ""
        text = f"{it:,} iterations of batch {bs} ({_epochs(it * bs / n)}{of})"
        if at:
            text = f"stopped at {at:,} of {text[:-1]}: {_epochs(at * bs / n)} done)"
        text += f", errors on {evals}" if per_schedule else ""
        parts.append(text if len(schedules) == 1 else f"{', '.join(sorted(names))}: {text}")
    seeds = sorted({int(v) for v in d["seed"]})
    presets = ", ".join(sorted(set(d["preset"])))
    tail = measured or ("" if per_schedule else "errors on " + next(iter(schedules))[4])
    return (f"{presets} preset: " + "; ".join(parts) + f"; seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))}" + (f"; {tail}" if tail else "") + left_out)


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
    """The paper's two claims on our numbers, shallowest vs deepest net, judged against seed noise as in
    `claims`: deeper plain trains worse; deeper ResNet does not. A diverged run on a side is no verdict, as in
    `claims`: the survivors' mean leaves out the run that failed."""
    from .claims import NOT_JUDGED, difference, diverged_text, verdict

    rows = []
    for arch, says, expect in (("plain", "deeper has HIGHER training error", "higher"),
                               ("resnet", "deeper has no higher training error", "not higher")):
        every = table[table["arch"] == arch].sort_values("depth")
        ends = [r for r in (every.iloc[0], every.iloc[-1]) if int(r["runs"]) == 0] if len(every) else []
        lost = [d for d in (diverged_text(r, arch) for r in ends) if d]
        if lost:  # the shallowest or deepest net diverged in every seed: comparing the next one would hide it
            rows.append({"arch": arch, "paper says": says, "shallow": "", "deep": "", "deep - shallow (95% CI)": "",
                         "holds here": f"{NOT_JUDGED} ({'; '.join(lost)})"})
            continue
        t = every[every["runs"] > 0]
        if len(t) < 2:  # said, not dropped: an empty frame with no columns reads as a broken cell
            only = (f"runs that finished without diverging at {int(t.iloc[0]['depth'])} layers only" if len(t)
                    else "no run that finished without diverging")
            rows.append({"arch": arch, "paper says": says, "shallow": "", "deep": "", "deep - shallow (95% CI)": "",
                         "holds here": f"not run ({only})"})
            continue
        lo, hi = t.iloc[0], t.iloc[-1]
        diff, half = difference(lo, hi, "train_err_%")
        spread = " (noise not estimated)" if half is None else f" ± {half:.2f}"
        diverged = [d for d in (diverged_text(r, arch) for r in (lo, hi)) if d]
        rows.append({"arch": arch, "paper says": says,
                     "shallow": f"{int(lo['depth'])}: {lo['train_err_%']:.1f}%",
                     "deep": f"{int(hi['depth'])}: {hi['train_err_%']:.1f}%",
                     "deep - shallow (95% CI)": f"{diff:+.2f}{spread}",
                     "holds here": (f"{NOT_JUDGED} ({'; '.join(diverged)})" if diverged
                                    else verdict(diff, half, expect))})
    return pd.DataFrame(rows)


# -- 02 depth (Table 6) ------------------------------------------------------------------------------
# He et al. 2015, Table 6 (%): one run per depth, except 110, where the paper gives the best of 5 runs (6.43) and
# their mean ± SD over the 5 runs (6.61 ± 0.16: an SD, not a 95% CI as ours); ours is a mean over seeds, so the
# mean is what it sits beside
PAPER_TEST_ERR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.61, 1202: 7.93}


def depth_configs(preset: str, depths: list[int], seeds: list[int], arch: str = "resnet") -> list[RunConfig]:
    """ResNets (option A) at each depth and seed; 110+ layers warm up as in the paper."""
    check_grid("depths", depths)
    check_grid("seeds", seeds, positive=True)
    return [make_config(preset, arch=arch, depth=d, seed=s) for d in depths for s in seeds]


def depth_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 6: depth, params, MACs, test error mean ± 95% CI over seeds, the paper's error beside it."""
    t = summarize(runs, ["arch", "depth"])
    t["paper_test_err_%"] = t["depth"].map(PAPER_TEST_ERR)
    return t


# -- 03 shortcut ablations ------------------------------------------------------------------------------
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(arch="plain"),  # the baseline row: same depth, no shortcuts
    "A": dict(),  # identity shortcuts, zero-padded at the two stage transitions (the CIFAR default)
    "B": dict(shortcut="B"),  # projections only where the shape changes
    "C": dict(shortcut="C"),  # projections on every block
    "skip1": dict(block_layers=1),  # blocks of one 3x3 conv
    "skip3": dict(block_layers=3),  # blocks of three 3x3 convs
    "preact": dict(arch="preact"),  # BN-ReLU-conv, nothing after the addition (He et al. 2016)
    "highway": dict(arch="highway"),  # exclusive gating T*F(x) + (1-T)*x, gate bias -2 (Srivastava et al. 2015)
    "gated": dict(arch="gated"),  # shortcut-only gating F(x) + (1-g)*x, gate bias -6 (He et al. 2016, Table 1)
    # 1x1-3x3-1x1 blocks, depth 9n+2, projections where the shape changes: the first block widens 16 to 64
    # channels, where option A would pad 48 zero channels (He et al. 2016's ResNet-164 code projects there)
    "bottleneck": dict(bottleneck=True, shortcut="B"),
}


def variant_of(row: dict[str, Any]) -> str:
    """Name the ablation variant of a stored run (a row of `load_runs`/`load_metrics`): the VARIANTS entry
    whose fields it has, every other field a variant sets at its RunConfig default; a run no entry describes
    (a config asked by hand) goes by its name, so it is never drawn as another variant's seed."""
    for name, fields in VARIANTS.items():
        if all(_same(row.get(k), v) for k, v in {**_VARIANT_BASE, **fields}.items()):
            return name
    return str(row.get("name") or RunConfig.from_json(row).name)


def _same(a: Any, b: Any) -> bool:
    """A row's value (numpy's bool from a DataFrame, NaN where missing) against a variant's."""
    if isinstance(b, bool):
        return a is not None and not pd.isna(a) and bool(a) == b
    return bool(a == b)


# the fields some variant sets, at their defaults: what every other variant has
_VARIANT_BASE = {k: RunConfig.__dataclass_fields__[k].default for v in VARIANTS.values() for k in v}


def ablation_configs(preset: str, variants: list[str], depths: list[int], seeds: list[int]) -> list[RunConfig]:
    """Every variant at every depth and seed (all checked before anything trains)."""
    check_grid("variants", variants, allowed=VARIANTS)
    check_grid("depths", depths)
    check_grid("seeds", seeds, positive=True)
    return [make_config(preset, depth=d, seed=s, **VARIANTS[v]) for v in variants for d in depths for s in seeds]


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Variant, depth, params, MACs, train/test error mean ± 95% CI over seeds."""
    t = summarize(with_variant(runs), ["variant", "depth"])
    if t.empty:
        return t
    order = {v: i for i, v in enumerate(VARIANTS)}
    return t.sort_values(["depth", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c)


def with_variant(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(variant=[variant_of(r) for r in df.to_dict("records")]) if not df.empty else df


# -- 05 thousand layers -----------------------------------------------------------------------------------
CPU_1202 = {"smoke": dict(iterations=2, batch_size=4, eval_every=2, eval_subset=32, train_subset=64),
            "quick": dict(iterations=6, batch_size=8, eval_every=3, eval_subset=100, train_subset=512,
                          milestones=(4,))}


def thousand_layer_configs(preset: str, depths: list[int], seeds: list[int], checkpoint_segments: int = 0
                           ) -> list[RunConfig]:
    """ResNet-110 and -1202 with the 110 recipe (warm-up at lr 0.01). On the CPU presets the 1202 runs a
    handful of iterations on a tiny batch: the curve and table work end to end, the claim needs `paper`."""
    check_grid("depths", depths)
    check_grid("seeds", seeds, positive=True)
    out = []
    for d in depths:
        extra = CPU_1202.get(preset, {}) if d > 200 else {}
        for s in seeds:
            out.append(make_config(preset, depth=d, seed=s, activation_checkpointing=checkpoint_segments, **extra))
    return out


# -- 06 layer responses ---------------------------------------------------------------------------------
def response_configs(preset: str, depths: list[int], seeds: list[int]) -> list[RunConfig]:
    """Plain and ResNet nets whose responses are compared: the runs of 01/02, reused from the store."""
    return degradation_configs(preset, depths, seeds)


NET_NAMES = {"plain": "plain", "resnet": "ResNet", "preact": "pre-act ResNet"}  # other archs: their own name


def net_label(cfg: RunConfig) -> str:
    """plain-56, ResNet-56, pre-act ResNet-110, highway-20: the `net` column of the response and unravel tables
    (04's paper grid analyses post- and pre-activation nets of one depth, which must not share a label)."""
    return f"{NET_NAMES.get(cfg.arch, cfg.arch)}-{cfg.depth}"


RESPONSE_COLUMNS = ["layer", "std", "channels", "rank", "arch", "depth", "seed", "net"]


def _measure(rd: RunDir, kind: str, p: dict[str, Any], compute: Callable[[torch.nn.Module], dict[str, pd.DataFrame]],
             device: str = "cpu") -> dict[str, pd.DataFrame]:
    """compute(model) on a finished run's model, stored in its folder as its cached `kind` analysis for
    settings p (`RunDir.write_analysis`: tied to the sha256 of the model.pt it ran on, with where, how long).
    Under the analysis's lock: a process that waited for another computing it reads that one's tables."""
    with rd.analysis_lock(kind, p):
        if (cached := rd.read_analysis(kind, p)) is not None:
            log.info("%s seed %d (run %s): %s analysis read from the cache another process wrote", rd.cfg.name,
                     rd.cfg.seed, rd.cfg.hash, kind)
            return cached
        return _compute_and_store(rd, kind, p, compute, device)


def _compute_and_store(rd: RunDir, kind: str, p: dict[str, Any],
                       compute: Callable[[torch.nn.Module], dict[str, pd.DataFrame]],
                       device: str) -> dict[str, pd.DataFrame]:
    from .train import device_name

    model, sha = rd.load_model_and_sha256(device)
    t0 = time.perf_counter()
    with exact_fp32():  # an fp32 analysis on a GPU is fp32, not TF32
        tables = compute(model)
    seconds = round(time.perf_counter() - t0, 1)
    log.info("%s seed %d (run %s): %s analysis computed in %.1f s", rd.cfg.name, rd.cfg.seed, rd.cfg.hash, kind,
             seconds)
    return rd.write_analysis(kind, p, tables, sha, device=device_name(torch.device(device)), seconds=seconds,
                             torch=str(torch.__version__))


RESPONSE_REVISION = 1  # bumped when layer_responses measures something else: cached tables are then ignored


def responses(runs: pd.DataFrame, source: str | os.PathLike | None = None, max_images: int = 10_000,
              root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Layer-response std of every stored run's model on (up to max_images) test images, on the CPU.

    Each run's table is cached in its folder (`RunDir.write_analysis`, keyed by max_images and the dataset,
    tied to the sha256 of its model.pt): a report reads it back instead of passing the images through every
    net again (quick's 12 nets, 2,000 images, on a 2-core CPU: 27 s, 3.8 s cached)."""
    from .analysis import layer_responses

    p = dict(revision=RESPONSE_REVISION, max_images=check_count("max_images", max_images), dataset=dataset_id(source))
    frames = [t["responses"].assign(arch=cfg.arch, depth=cfg.depth, seed=cfg.seed, net=net_label(cfg))
              for cfg, t in _per_run(runs[runs["status"] == "done"], "responses", p, source, max_images, root,
                                     lambda m, batches: {"responses": layer_responses(m, batches)})]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESPONSE_COLUMNS)


def _per_run(runs: pd.DataFrame, kind: str, p: dict[str, Any], source: str | os.PathLike | None, max_images: int,
             root: str | os.PathLike | None,
             compute: Callable[[torch.nn.Module, Any], dict[str, pd.DataFrame]]) -> Iterator[tuple[RunConfig, dict]]:
    """(config, tables) of each run: its cached `kind` analysis (`RunDir.read_analysis`), else compute(model,
    batches of up to max_images test images) through `_measure`, which caches it. The images are decoded only
    when some run is not cached; a run restored from its record (no weights) needs its cache."""
    from .data import eval_batches
    from .runs import RunDir

    test = None
    for r in runs.to_dict("records"):
        rd = RunDir(RunConfig.from_json(r), root)
        tables = rd.read_analysis(kind, p)
        if tables is None:
            if test is None:
                data = load_cifar10(source)
                test = balanced_subset(data.test_x, data.test_y, max_images)
            tables = _measure(rd, kind, p, lambda m: compute(m, eval_batches(*test)), "cpu")
        yield rd.cfg, tables


def response_summary(resp: pd.DataFrame) -> pd.DataFrame:
    """Mean response std of each net, per seed and over seeds: the numbers Fig. 7's ordering is read from
    (ResNet below plain of the same depth, deeper ResNets lower), seed by seed."""
    if resp.empty:
        return pd.DataFrame(columns=["net", "seeds", "mean"])
    t = resp.groupby(["arch", "depth", "net", "seed"])["std"].mean().unstack("seed")
    t.columns = [f"seed {c}" for c in t.columns]
    t["seeds"] = t.notna().sum(axis=1)  # a net missing a seed: its mean is over fewer, and says so
    t["mean"] = t.drop(columns="seeds").mean(axis=1)
    return t.reset_index().drop(columns=["arch", "depth"])


# -- 04 unraveled ensemble (Veit et al. 2016) ------------------------------------------------------------
def unravel_configs(preset: str, depth: int, seeds: list[int], arch: str = "resnet") -> list[RunConfig]:
    """The residual net under study and the plain net of the same depth (the baseline that collapses)."""
    check_grid("seeds", seeds, positive=True)
    check_grid("arch", [arch], allowed=("resnet", "preact"))
    return [make_config(preset, arch=a, depth=depth, seed=s) for a in (arch, "plain") for s in seeds]


# The columns of each unravel_analysis table, so that a store with no finished run (a GPU session at a time)
# still gives tables the notebook can show and save; a test holds them to what the analyses return.
UNRAVEL_TAGS = ["net", "arch", "depth", "seed"]
UNRAVEL_COLUMNS = {
    "lesion": ["block", "stage", "changes_shape", "has_shortcut", "err", "base_err"],
    "delete": ["k", "draw", "blocks", "err"],
    "reorder": ["k", "draw", "pairs", "kendall_tau", "err"],
    "paths": ["k", "paths", "share"],
    "gradient": ["k", "sample", "blocks", "grad_norm", "mean_grad_norm", "paths", "total"],
    # gradient_share_%: the share of the run's total gradient the range holds (at least 90%: `gradient_share`)
    "effective": ["blocks", "effective_from", "effective_to", "share_of_paths_%", "gradient_share_%"],
}


def gradient_share(effective: pd.DataFrame, gradient: pd.DataFrame) -> pd.DataFrame:
    """One run's effective table with `gradient_share_%`: the % of its total gradient (`total` per length k in its
    gradient table) that the lengths effective_from..effective_to hold."""
    per_k = gradient.groupby("k")["total"].first().astype(float) if len(gradient) else pd.Series(dtype=float)
    whole = float(per_k.sum())
    share = [100 * float(per_k[(per_k.index >= lo) & (per_k.index <= hi)].sum()) / whole if whole > 0 else math.nan
             for lo, hi in zip(effective["effective_from"], effective["effective_to"])]
    return effective.assign(**{"gradient_share_%": share})


def _spread(top: int, points: int = 10) -> list[int]:
    """About `points` integers from 0 to top inclusive."""
    step = max(1, round(top / (points - 1)))
    return sorted(set(list(range(0, top + 1, step)) + [top]))


VEIT_DELETE_K = 10  # Veit et al.: deleting 10 of ResNet-110's 54 blocks gives about 20% error


def delete_ks(blocks: int) -> list[int]:
    """The k of the delete-k curve: about ten from 0 to all blocks, and the paper's k = 10 where the net
    has that many blocks, so its ~20% can be read off our curve (ResNet-110's spread alone steps by 6)."""
    return sorted(set(_spread(blocks) + ([VEIT_DELETE_K] if blocks >= VEIT_DELETE_K else [])))


# Bumped when the analysis measures something else: tables cached by the old one are ignored.
# 2: reorder pairs drawn uniformly over same-stage pairs, never a pre-act net's first block. 3: deletions and
# reorderings distinct per k (one stream per k), gradient paths distinct until every path of a length is measured.
# 4: delete-k also at Veit et al.'s k = 10 (nets of 10 blocks or more; other k unchanged, each has its stream).
# 5: reorder rows carry the new order's Kendall tau (Veit et al. Fig. 5(b)).
UNRAVEL_REVISION = 5


def unravel_params(draws: int = 5, eval_images: int = 10_000, grad_samples: int = 10, grad_batch: int = 128,
                   source: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a cached unravel analysis depends on besides the model: its settings and the CIFAR-10 copy."""
    for name, v in (("draws", draws), ("eval_images", eval_images), ("grad_samples", grad_samples),
                    ("grad_batch", grad_batch)):
        check_count(name, v)  # before any analysis: a bad count failed after minutes of lesions, or never
    return dict(revision=UNRAVEL_REVISION, draws=draws, eval_images=eval_images, grad_samples=grad_samples,
                grad_batch=grad_batch, dataset=dataset_id(source))


def _unravel_run(model: torch.nn.Module, cfg: RunConfig, test: tuple[torch.Tensor, torch.Tensor],
                 train: tuple[torch.Tensor, torch.Tensor], p: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """One run's tables: the lesion for every net; delete-k, reorder-k, paths, gradient and effective range
    for residual ones."""
    from . import unravel as U

    x, y = test
    tag = dict(net=net_label(cfg), arch=cfg.arch, depth=cfg.depth, seed=cfg.seed)
    out = {"lesion": U.lesion_blocks(model, x, y).assign(**tag)}
    if cfg.arch == "plain":
        return out
    m = len(model.blocks)
    out["delete"] = U.delete_k(model, x, y, delete_ks(m), p["draws"], seed=cfg.seed).assign(**tag)
    pairs = sum(len(g) // 2 for g in U.swappable_groups(model))
    out["reorder"] = U.reorder_k(model, x, y, _spread(pairs), p["draws"], seed=cfg.seed).assign(**tag)
    out["paths"] = U.path_length_distribution(m).assign(**tag)
    # Veit et al.: a random training batch per measurement
    grad = U.gradient_by_path_length(model, *train, list(range(m + 1)), p["grad_samples"], seed=cfg.seed,
                                     batch=p["grad_batch"])
    out["gradient"] = grad.assign(**tag)
    lo, hi = U.effective_paths(grad, 0.9)
    share = 100 * sum(math.comb(m, k) for k in range(lo, hi + 1)) / 2 ** m
    out["effective"] = gradient_share(pd.DataFrame([{**tag, "blocks": m, "effective_from": lo, "effective_to": hi,
                                                     "share_of_paths_%": share}]), grad)
    return out


def _analyse_command(cfg: RunConfig, p: dict[str, Any]) -> str:
    """The `resnet-lab analyse` call that caches this run's unravel analysis with these settings."""
    arch = "" if cfg.arch in ("resnet", "plain") else f" -p arch={cfg.arch}"  # a plain run is every arch's twin
    extra = "" if p["grad_batch"] == 128 else f" (and grad_batch={p['grad_batch']}, which only unravel_analysis takes)"
    return (f"resnet-lab analyse --notebook 04_unraveled_ensemble --preset {cfg.preset} -p depth={cfg.depth}{arch} "
            f"-p 'seeds=[{cfg.seed}]' -p draws={p['draws']} -p eval_images={p['eval_images']} "
            f"-p grad_samples={p['grad_samples']}{extra}")


def unravel_analysis(runs: pd.DataFrame, draws: int = 5, eval_images: int = 10_000, grad_samples: int = 10,
                     grad_batch: int = 128, source: str | os.PathLike | None = None,
                     root: str | os.PathLike | None = None, device: str | None = None,
                     compute_missing: bool = True) -> dict[str, Any]:
    """Every table of the notebook, from the stored runs: lesion, delete-k, reorder-k, path lengths,
    gradient by path length and the effective path range (per residual run; lesion for plain runs too).

    Each run's tables are cached in its folder (`RunDir.write_analysis`, keyed by these settings and the
    dataset, tied to the sha256 of its model.pt): ResNet-110's take hours on a CPU and minutes on a GPU,
    so `resnet-lab analyse` computes them where training ran and reports here read them back.
    compute_missing=False (what `report` asks): a run without a cached analysis is left out of the tables
    with a warning that gives the command computing it."""
    from .runs import RunDir

    p = unravel_params(draws, eval_images, grad_samples, grad_batch, source)
    dev = str(resolve_device(device))
    data = None
    out: dict[str, list[pd.DataFrame]] = {k: [] for k in UNRAVEL_COLUMNS}
    for r in runs[runs["status"] == "done"].to_dict("records"):
        rd = RunDir(RunConfig.from_json(r), root)
        tables = rd.read_analysis("unravel", p)
        if tables is None and not compute_missing:
            log.warning("%s seed %d (run %s) is left out: no cached unravel analysis for these settings. "
                        "Compute it with: %s", rd.cfg.name, rd.cfg.seed, rd.cfg.hash, _analyse_command(rd.cfg, p))
            continue
        if tables is None:
            if data is None:  # decoded only when some run is not cached
                data = load_cifar10(source)
                test, train = balanced_subset(data.test_x, data.test_y, eval_images), (data.train_x, data.train_y)
            tables = _measure(rd, "unravel", p, lambda m: _unravel_run(m, rd.cfg, test, train, p), dev)
        else:
            log.info("%s seed %d (run %s): unravel analysis read from its cache", rd.cfg.name, rd.cfg.seed,
                     rd.cfg.hash)
        for k, df in tables.items():
            out[k].append(df)
    return {k: (pd.concat(v, ignore_index=True) if v else
                pd.DataFrame(columns=UNRAVEL_TAGS + UNRAVEL_COLUMNS[k] if k == "effective" else
                             UNRAVEL_COLUMNS[k] + UNRAVEL_TAGS)) for k, v in out.items()}


# median_err_excl_downsampling_%: over the blocks that keep their shape (a downsampling/transition block's
# deletion is a different kind of damage, and a plain net's cannot be deleted at all), as the claims' medians
LESION_SUMMARY_COLUMNS = ["net", "seeds", "intact_err_%", "median_err_excl_downsampling_%", "worst_block",
                          "worst_blocks", "worst_err_%", "downsampling_err_%"]


def lesion_by_block(g: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """One net's lesion rows -> (per block: `err`, its lesion error averaged over seeds, `cost` = err minus the
    intact error, and `down`, whether it changes the shape; the intact error averaged over seeds). The one
    definition `lesion_summary` and the lesion claims (`claims.lesions`) both read, so the medians agree."""
    per_block = g.assign(err=g["err"].astype(float)).groupby("block").agg(err=("err", "mean"),
                                                                           down=("changes_shape", "first"))
    per_block["down"] = per_block["down"].astype(bool)
    intact = g.drop_duplicates("seed")["base_err"] if "seed" in g else g["base_err"].iloc[:1]
    base = float(intact.astype(float).mean())
    per_block["cost"] = per_block["err"] - base  # = the seeds' mean cost where every seed has every block
    return per_block, base


def lesion_medians(per_block: pd.DataFrame) -> pd.DataFrame:
    """The blocks that keep their shape, NaN dropped (a plain net's transition blocks): what medians are over."""
    return per_block.loc[~per_block["down"]].dropna(subset=["err"])


def worst_blocks(kept: pd.DataFrame, col: str = "err") -> list[int]:
    """Every block at the worst value of `col` (ties named, not broken by block order)."""
    if kept.empty:
        return []
    top = kept[col].max()
    return [int(b) for b in kept.index[(kept[col] - top).abs() <= 1e-9]]


def lesion_summary(lesion: pd.DataFrame) -> pd.DataFrame:
    """Per net, each block's lesion error averaged over seeds (`lesion_by_block`): the intact error, the median
    over the blocks that keep their shape, the worst of those (`worst_blocks`: every block tied at it;
    `worst_block`: the first), and the worst downsampling one apart (Veit et al.: only those hurt a ResNet; a
    plain net's cannot be removed, NaN)."""
    rows = []
    for net, g in lesion.groupby("net", sort=False):
        per_block, base = lesion_by_block(g)
        kept = lesion_medians(per_block)
        down = per_block.loc[per_block["down"], "err"].dropna()
        worst = worst_blocks(kept)
        rows.append({"net": net, "seeds": g["seed"].nunique(), "intact_err_%": 100 * base,
                     "median_err_excl_downsampling_%": 100 * kept["err"].median() if len(kept) else math.nan,
                     "worst_block": worst[0] if worst else pd.NA,
                     "worst_blocks": ", ".join(map(str, worst)),
                     "worst_err_%": 100 * kept["err"].max() if len(kept) else math.nan,
                     "downsampling_err_%": 100 * down.max() if len(down) else math.nan})
    return pd.DataFrame(rows, columns=LESION_SUMMARY_COLUMNS).astype({"worst_block": "Int64"})


def imagenet_configs(preset: str, depths: list[int]) -> list[RunConfig]:
    """None: 07 times untrained nets. Its preset (the output folder) and depths are checked here, so a sweep
    refuses a bad one before it runs."""
    from .analysis import IMAGENET_PAPER_GMACS

    check_preset(preset)
    check_grid("depths", depths, allowed=sorted(IMAGENET_PAPER_GMACS))
    return []


def imagenet_architectures(depths: list[int], batch_size: int = 8, device: str = "auto", repeats: int = 3,
                           backward: bool = True) -> pd.DataFrame:
    """07's table: parameters and multiply-adds of torchvision's ImageNet ResNets (both stride placements), and
    the median seconds per batch measured here, on the device each row names."""
    from .analysis import imagenet_model, imagenet_table, time_model
    from .train import device_name

    check_count("batch_size", batch_size)
    check_count("repeats", repeats)
    dev = resolve_device(device)
    table = imagenet_table(depths)
    table["forward_s"] = [time_model(imagenet_model(d), batch_size, dev, repeats=repeats) for d in depths]
    if backward:
        table["forward_backward_s"] = [time_model(imagenet_model(d), batch_size, dev, repeats=repeats, backward=True)
                                       for d in depths]
    table["device"], table["batch_size"] = device_name(dev), batch_size
    return table


# -- 08 fast-path fidelity (issue #8) ---------------------------------------------------------------------
# The reference loop: fp32 and the eager step, what `train_step` computes and the graph is checked against.
REFERENCE_LOOP = dict(precision="fp32", fast=False)
FIDELITY_COLUMNS = ["compared", "fast", "reference", "reference - fast", "criterion", "holds here"]


FAST_PRECISIONS = ("auto", "bf16", "fp16")  # what the fast runs may train in: anything but the reference's fp32


def fidelity_configs(preset: str, depth: int, seeds: list[int], reference_seeds: list[int],
                     precision: str = "auto") -> list[RunConfig]:
    """A ResNet trained by our fast step (bf16 autocast and a CUDA graph on a GPU; or precision="fp16") at
    each seed, and the same net by the reference loop (fp32, eager) at each reference seed: does the fast
    path learn the same?"""
    check_grid("seeds", seeds, positive=True)
    check_grid("reference_seeds", reference_seeds, positive=True)
    if precision not in FAST_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid for the fast runs: use one of {list(FAST_PRECISIONS)} "
                         "(fp32 is the reference loop's)")
    return ([make_config(preset, arch="resnet", depth=depth, seed=s, precision=precision) for s in seeds]
            + [make_config(preset, arch="resnet", depth=depth, seed=s, **REFERENCE_LOOP) for s in reference_seeds])


UNRECORDED = "unrecorded"  # a run whose summary predates compute_dtype or step_mode
REFERENCE_RAN = "fp32, eager"  # the loop the reference run must have run for the check to mean anything
MIN_FAST_RUNS = 3  # fewer fast seeds give a prediction interval too wide (t(1) = 12.7) to say "yes" on


def _loops(runs: pd.DataFrame) -> pd.Series:
    """Each run's loop as its summary records it: 'bf16, graph' (dtype, step mode; sittings that differed
    are joined, 'eager + graph')."""
    def part(col: str) -> pd.Series:
        v = runs[col] if col in runs else pd.Series([None] * len(runs), index=runs.index)
        return v.map(lambda x: UNRECORDED if x is None or (isinstance(x, float) and math.isnan(x)) or x == "" else str(x))

    return part("compute_dtype") + ", " + part("step_mode")


def fidelity_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final errors per precision asked and loop that ran ("bf16, graph": the dtype and step mode the runs'
    summaries record, which say what happened where the config says what was asked), mean ± 95% CI;
    diverged runs counted, not averaged."""
    return summarize(runs.assign(loop=_loops(runs) if not runs.empty else []), ["precision", "loop"])


def fidelity_verdict(table: pd.DataFrame, precision: str | None = None) -> pd.DataFrame:
    """Does the reference loop (fp32, eager) learn what the fast step (a CUDA graph) learns? Per error (test,
    training): with one reference run, inside the fast runs' 95% prediction interval for one more seed;
    with more, the difference inside its 95% CI (Welch). `yes` needs MIN_FAST_RUNS fast seeds (fewer:
    `within noise`); a divergence on one side only is `NO`. Where the loops are not the two compared (a
    CPU runs fp32 eager both times; a graph that fell back; a loop not recorded) it says so, judging nothing.
    precision: the fast runs' (None: the table's one precision other than fp32, "auto" when it has none)."""
    from .claims import NOISE, difference, prediction_half_width

    rows = []
    if "diverged" not in table:  # a table written without the column: no run counted as diverged
        table = table.assign(diverged=0)
    live = table[table["runs"] + table["diverged"] > 0]
    others = sorted({str(p) for p in live["precision"]} - {"fp32"})
    ambiguous = precision is None and len(others) > 1
    if precision is None:
        precision = others[0] if len(others) == 1 else "auto"
    sides = {"fast": live[live["precision"] == precision], "reference": live[live["precision"] == "fp32"]}
    for col, what in (("test_err_%", "final test error"), ("train_err_%", "final training error")):
        row = {"compared": what, "fast": "", "reference": "", "reference - fast": "", "criterion": "", "holds here": ""}
        rows.append(row)
        if ambiguous:
            row["holds here"] = f"not judged (fast runs of several precisions: {', '.join(others)}; name one)"
            continue
        if any(len(t) == 0 for t in sides.values()):
            row["holds here"] = "not run (" + " and ".join(
                f"no finished {name} run" for name, t in sides.items() if len(t) == 0) + ")"
            continue
        if any(len(t) > 1 for t in sides.values()):
            row["holds here"] = "not judged (runs of one precision ran different loops: " + "; ".join(
                sorted(map(str, set(table["loop"])))) + ")"
            continue
        f, r = sides["fast"].iloc[0], sides["reference"].iloc[0]
        row["fast"], row["reference"] = _loop_text(f, col), _loop_text(r, col)
        why = _not_comparable(str(f["loop"]), str(r["loop"]))
        if why:
            row["holds here"] = f"not judged ({why})"
            continue
        fd, rd = int(f["diverged"]), int(r["diverged"])
        if fd or rd:
            row["holds here"] = ("not judged (runs diverged in both loops)" if fd and rd else
                                 f"NO ({fd} of {fd + int(f['runs'])} fast runs diverged; the reference did not)" if fd
                                 else "NO (the reference diverged; the fast runs did not)")
            continue
        d = float(r[col]) - float(f[col])
        if int(r["runs"]) == 1:
            half = prediction_half_width(f, col)
            crit = "inside the fast runs' 95% prediction interval for one more seed"
        else:
            _, half = difference(f, r, col)
            crit = "difference inside its 95% CI (Welch)"
        row.update({"reference - fast": f"{d:+.2f}" + ("" if half is None else f" (interval ± {half:.2f})"),
                    "criterion": crit})
        n = int(f["runs"])
        row["holds here"] = ("not judged (seed noise not estimated: one fast run)" if half is None else
                             "NO" if abs(d) > half else "yes" if n >= MIN_FAST_RUNS else
                             f"{NOISE} (only {n} fast runs: the interval is too wide to say yes)")
    return pd.DataFrame(rows, columns=FIDELITY_COLUMNS)


def _not_comparable(fast: str, ref: str) -> str | None:
    """Why these two loops are not the fast step against the reference loop, or None."""
    if UNRECORDED in fast or UNRECORDED in ref:
        return f"a loop is not recorded in the runs' summaries: {fast}; {ref}"
    if fast == ref:
        return f"both loops ran {fast}: the same computation"
    if ref != REFERENCE_RAN or fast.split(", ")[-1] not in ("graph", "graph+compile"):
        return f"the check compares a CUDA-graph step with {REFERENCE_RAN}; these ran {fast} and {ref}"
    return None


def _loop_text(row: pd.Series, col: str) -> str:
    """'bf16, graph: 12.20% ± 0.50 (3 runs)': a loop's mean, its CI over seeds where there are several."""
    from .claims import ci_col

    n, dv = int(row["runs"]), int(row.get("diverged", 0) or 0)
    spread = f" ± {float(row[ci_col(col)]):.2f}" if n > 1 else ""
    mean = f"{float(row[col]):.2f}%{spread}" if n else "no mean"
    return f"{row['loop']}: {mean} ({n} run{'s' if n != 1 else ''}" + (f", {dv} diverged)" if dv else ")")


def fidelity_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The finished runs' curves labelled by the loop each ran (its precision asked, then what ran)."""
    if curves.empty or runs.empty:
        return curves.assign(loop=pd.Series(dtype=str))
    label = dict(zip(runs["hash"], runs["precision"].astype(str) + ": " + _loops(runs)))
    return curves.assign(loop=curves["hash"].map(label))


# -- which runs a notebook needs (sweeps and reports ask this without executing the notebook) ----------
# notebook -> (the function that names its runs, the notebook parameters it takes, in order)
NOTEBOOK_CONFIGS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "01_degradation": (degradation_configs, ("preset", "depths", "seeds")),
    "02_depth": (depth_configs, ("preset", "depths", "seeds")),
    "03_shortcut_ablations": (ablation_configs, ("preset", "variants", "depths", "seeds")),
    "04_unraveled_ensemble": (unravel_configs, ("preset", "depth", "seeds", "arch")),
    "05_thousand_layers": (thousand_layer_configs, ("preset", "depths", "seeds", "checkpoint_segments")),
    "06_layer_responses": (response_configs, ("preset", "depths", "seeds")),
    "07_imagenet_architectures": (imagenet_configs, ("preset", "depths")),  # measures untrained nets
    "08_fast_path_fidelity": (fidelity_configs, ("preset", "depth", "seeds", "reference_seeds", "precision")),
}
READS_NO_RUNS = frozenset({"07_imagenet_architectures"})  # its configs are none: it records no runs it drew
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def known_notebook(notebook: str) -> str:
    """The notebook's stem, or a ValueError naming it and the notebooks that train (NOTEBOOK_CONFIGS)."""
    if notebook not in NOTEBOOK_CONFIGS:
        raise ValueError(f"notebook {notebook!r} is unknown: use one of {sorted(NOTEBOOK_CONFIGS)}")
    return notebook


def notebook_defaults(notebook: str) -> dict[str, Any]:
    """The literals of a notebook's parameters cell, so sweeps and reports never restate them."""
    from .sweep import notebook_parameters, parameter_default

    path = NOTEBOOKS_DIR / f"{known_notebook(notebook)}.ipynb"
    out = {}
    for name, spec in notebook_parameters(path).items():
        out[name] = parameter_default(spec)
        if out[name] is ...:
            raise ValueError(f"{path}: parameter {name} = {spec['default']} is not a literal: a parameters cell "
                             f"holds plain literals (derived values go in the next cell)")
    return out


def configs_for(notebook: str, params: dict[str, Any]) -> list[RunConfig]:
    """The RunConfigs a notebook trains for these papermill parameters (notebook = file stem)."""
    fn, names = NOTEBOOK_CONFIGS[known_notebook(notebook)]
    merged = {**notebook_defaults(notebook), **params}
    return fn(*[merged[n] for n in names])


def _unravel_from_params(runs: pd.DataFrame, p: dict[str, Any], device: str | None) -> None:
    unravel_analysis(runs, draws=p["draws"], eval_images=p["eval_images"], grad_samples=p["grad_samples"],
                     device=device)  # as notebook 04 calls it, so that it finds what this caches


@dataclasses.dataclass(frozen=True)
class CachedAnalysis:
    """A notebook's slow analysis, cached in each finished run's folder (`_measure`): what `resnet-lab analyse`
    computes ahead (on the GPU) and what a report reads (`drawn_runs`: the runs whose cache exists)."""

    compute: Callable[[pd.DataFrame, dict[str, Any], str | None], None]  # (runs, notebook parameters, device)
    kind: str  # the cache's kind (RunDir.analysis_file: lowercase letters)
    reads: tuple[str, ...]  # the notebook parameters it depends on
    key: Callable[..., dict[str, Any]]  # those parameters -> the parameters its cache is keyed on


# notebook -> its cached analysis
NOTEBOOK_ANALYSES: dict[str, CachedAnalysis] = {
    "04_unraveled_ensemble": CachedAnalysis(_unravel_from_params, "unravel", ("draws", "eval_images", "grad_samples"),
                                            unravel_params)}


DRAWS_STOPPED = {"05_thousand_layers"}  # notebooks that draw runs stopped part-way too (`unfinished`)


def drawn_runs(notebook: str, params: dict[str, Any]) -> tuple[list[str], int]:
    """(the hashes of the runs a notebook's tables would be drawn from now, how many runs it reads): the
    finished ones (05: and those stopped part-way, which it shows apart); for a notebook whose analyses are
    cached (04), the done ones whose analysis for these settings is cached, since a report
    (analyse_missing=False) leaves the others out. Trains nothing; raises ValueError for a notebook that
    reads no runs, or parameters it rejects."""
    merged = {**notebook_defaults(notebook), **params}
    cfgs = configs_for(notebook, merged)  # collect names their dataset
    if not cfgs:
        raise ValueError(f"notebook {notebook!r} reads no runs")
    runs = collect(cfgs)[0]
    if notebook not in NOTEBOOK_ANALYSES:
        drawn = runs["status"].isin(["done", "diverged"])
        if notebook in DRAWS_STOPPED and not runs.empty:
            drawn |= stopped_part_way(runs)
        return sorted(runs.loc[drawn, "hash"]), len(cfgs)
    return _by_analysis(notebook, merged, runs)[0], len(cfgs)


def _by_analysis(notebook: str, merged: dict[str, Any], runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(the hashes of the done runs whose analysis for these notebook parameters is cached, of those without)."""
    a = NOTEBOOK_ANALYSES[notebook]
    p = a.key(**{n: merged[n] for n in a.reads})
    done = runs[runs["status"] == "done"].to_dict("records") if not runs.empty else []
    cached = {r["hash"]: RunDir(RunConfig.from_json(r)).read_analysis(a.kind, p) is not None for r in done}
    return sorted(h for h, c in cached.items() if c), sorted(h for h, c in cached.items() if not c)


def unanalysed_runs(notebook: str, params: dict[str, Any]) -> list[str]:
    """The hashes of the done runs a notebook's execution with these parameters reads whose cached analysis is
    missing: what `resnet-lab analyse` would compute (`runs export --to-analyse` sends them, with their
    weights, to the GPU that computes it in minutes, where a CPU takes hours). Trains and computes nothing."""
    if notebook not in NOTEBOOK_ANALYSES:
        raise ValueError(f"notebook {notebook!r} caches no analysis: use one of {sorted(NOTEBOOK_ANALYSES)}")
    merged = {**notebook_defaults(notebook), **params}
    return _by_analysis(notebook, merged, collect(configs_for(notebook, merged))[0])[1]


def analyse_notebook(notebook: str, params: dict[str, Any], device: str | None = None
                     ) -> tuple[list[RunConfig], list[RunConfig], list[RunConfig]]:
    """Compute and cache the analyses a notebook's execution with these parameters reads, on its finished
    runs; returns (the configs analysed, those that diverged: finished, never analysed, those not
    finished yet). Trains nothing."""
    if notebook not in NOTEBOOK_ANALYSES:
        raise ValueError(f"notebook {notebook!r} caches no analysis: use one of {sorted(NOTEBOOK_ANALYSES)}")
    merged = {**notebook_defaults(notebook), **params}
    cfgs = with_dataset(configs_for(notebook, merged))
    runs = collect(cfgs)[0]
    NOTEBOOK_ANALYSES[notebook].compute(runs, merged, device)
    status = dict(zip(runs["hash"], runs["status"]))
    return ([c for c in cfgs if status.get(c.hash) == "done"], [c for c in cfgs if status.get(c.hash) == "diverged"],
            [c for c in cfgs if status.get(c.hash) not in ("done", "diverged")])


GATE_REVISION = 1  # bumped when gate_means measures something else: cached tables are then ignored


def highway_gates(runs: pd.DataFrame, source: str | os.PathLike | None = None, max_images: int = 2_000,
                  root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Mean gate per block of every finished highway or gated run over `max_images` test images (empty when
    there are none); `net` names the architecture and depth, `seed` the run, so a figure averages the seeds
    of one net."""
    from .analysis import gate_means

    hw = runs[runs["arch"].isin(GATED_ARCHS) & (runs["status"] == "done")] if not runs.empty else runs
    if hw.empty:
        return pd.DataFrame(columns=["block", "mean_gate", "net", "seed"])
    p = dict(revision=GATE_REVISION, max_images=check_count("max_images", max_images), dataset=dataset_id(source))
    frames = [t["gates"].assign(net=f"{cfg.arch}-{cfg.depth}", seed=int(cfg.seed))  # cached like the responses
              for cfg, t in _per_run(hw, "gates", p, source, max_images, root,
                                     lambda m, batches: {"gates": gate_means(m, batches)})]
    return pd.concat(frames, ignore_index=True)


def thousand_curves(curves: pd.DataFrame, unfinished_curves: pd.DataFrame) -> pd.DataFrame:
    """The finished runs' curves, `depth` as a label, and beside them those of `unfinished(...)`."""
    frames = [f for f in (curves.assign(depth=curves["depth"].astype(str)), unfinished_curves) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else curves


def thousand_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final train/test error of the 110 and 1202 runs; `iterations`: what the finished runs trained (none
    finished: NaN), `eval_images`: the images their errors are over, `diverged_at`: the last evaluated step
    of each run that diverged (a 1202-layer net can)."""
    t = depth_table(runs)
    if not t.empty:
        done = runs[runs["status"] == "done"]
        t["iterations"] = t["depth"].map(done.groupby("depth")["iterations"].max()).astype("Int64")
        # the images its errors were measured on: quick's ResNet-1202 is a 100-image plumbing check beside
        # nets evaluated on 1,000, and the table should say so where it shows the numbers
        imgs = done.assign(n=[eval_images(r) for r in done.to_dict("records")])
        per = imgs.groupby("depth")["n"].agg(lambda s: ", ".join(f"{v:,}" for v in sorted(set(s))))
        t["eval_images"] = [per.get(d, "") for d in t["depth"]]
        div = runs[runs["status"] == "diverged"].sort_values("steps_done")
        at = div.groupby("depth")["steps_done"].agg(lambda s: ", ".join(f"{int(v):,}" for v in s.dropna()))
        t["diverged_at"] = [at.get(d, "") for d in t["depth"]]
    return t
