"""Analyses over models, tensors and run tables; pure functions that return numbers or DataFrames."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import NON_RESULT_FIELDS
from .models import count_params
from .runs import JOINED

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (uint8 images, labels) chunks, e.g. data.eval_batches


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one forward pass on one image (FlopCounterMode counts 2 FLOPs per MAC)."""
    was = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops() // 2)


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step, then odd step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def _t_tail(t: float, dof: float) -> float:
    """P(T > t) for Student's t with real `dof` > 0 and t >= 0: I_x(dof/2, 1/2) / 2 with x = dof/(dof+t^2)."""
    a, b, x = dof / 2, 0.5, dof / (dof + t * t)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return 0.5 * front * _beta_cf(a, b, x) / a
    return 0.5 * (1.0 - front * _beta_cf(b, a, 1.0 - x) / b)


def t975(dof: float) -> float:
    """97.5% quantile of Student's t for any real dof >= 0.1 (Welch's are fractional, and >= 1); no scipy.

    Bisection on the tail probability, to 1e-10: exact where a table would round the dof.
    """
    if not dof >= 0.1:  # below, the quantile passes 1e20 and its square overflows a float
        raise ValueError(f"dof={dof!r} is not valid: use a number >= 0.1")
    lo, hi = 1.959, 13.0  # t(1) = 12.71; below 1 dof the tail is heavier: widen until it brackets the quantile
    while _t_tail(hi, dof) > 0.025:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-10 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_tail(mid, dof) > 0.025 else (lo, mid)
    return (lo + hi) / 2


def ci95(values: Sequence[float] | pd.Series) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t).

    NaN for fewer than two values: one run says nothing about seed noise, and 0 would claim there is none.
    """
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    n = len(v)
    if n < 2:
        return float("nan")
    return t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n)


def _macs(summary: pd.Series) -> int:
    """A run's multiply-adds: its summary's `macs`; a summary from before that field (session 24) stored them as
    `flops` (He et al.'s sense of the word), since then flops are 2 per multiply-add."""
    macs = summary.get("macs")
    return int(summary["flops"] if macs is None or pd.isna(macs) else macs)


def summarize(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean ± 95% CI over seeds of final train/test error (in %), with params and MACs, grouped by `by`.

    Both errors carry their CI: the degradation claim is about training error, and a claim is only
    as good as the seed noise of the difference it rests on (`claims.difference`).

    Diverged runs are counted (`diverged`) but not averaged: their last error is that of NaN
    logits, which says nothing about the net. `runs` counts the runs the means are over.
    """
    columns = by + [c for c in ("runs", "params", "macs", "train_err_%", "train_err_ci95", "test_err_%",
                                "test_err_ci95", "diverged", "wall_min", "packed", "device", "dataset", "pixels",
                                "pad_fill") if c not in by]  # a grouping key is not a second column
    done = runs[runs["status"].isin(["done", "diverged"])] if not runs.empty else runs
    if done.empty:  # no run finished yet (all stopped part-way, say): the table's columns, no rows
        return pd.DataFrame(columns=columns)
    rows = []
    for key, g in done.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        _check_seeds_only(g, dict(zip(by, key)))
        ok = g[g["status"] == "done"]
        rows.append({
            **dict(zip(by, key)),
            "runs": len(ok),
            "params": int(g["params"].iloc[0]),
            "macs": _macs(g.iloc[0]),
            "train_err_%": 100 * ok["final_train_err"].astype(float).mean(),
            "train_err_ci95": 100 * ci95(ok["final_train_err"].astype(float)),
            "test_err_%": 100 * ok["final_test_err"].astype(float).mean(),
            "test_err_ci95": 100 * ci95(ok["final_test_err"].astype(float)),
            "diverged": int((g["status"] == "diverged").sum()),
            # wall time per run; a packed run's clock also ran while its neighbours stepped
            "wall_min": _wall_min(ok),
            "packed": int(pd.to_numeric(g["packed_runs"], errors="coerce").fillna(1).max()) if "packed_runs" in g else 1,
            # every device once, a run's joined ones split (runs.JOINED)
            "device": JOINED.join(sorted({d for v in g.get("device", pd.Series(dtype=str)).dropna()
                                         for d in str(v).split(JOINED)})),
            # which CIFAR-10 copy (sha256 prefix, as the run folders' summaries hold it): the JPEG one or another
            "dataset": ", ".join(sorted({str(s)[:16] for s in g.get("dataset_sha256", pd.Series(dtype=str)).dropna()})),
            "pixels": _pixels(g),
            # the crop's border (one per row: rows pool seeds only); it moves absolute errors by points
            "pad_fill": str(g["pad_fill"].iloc[0]) if "pad_fill" in g else "",
        })
    return pd.DataFrame(rows)


def _wall_min(ok: pd.DataFrame) -> float:
    """Mean minutes per run over the finished runs that trained on one device: a run that moved (a GPU's
    start finished on a CPU) has no one device's time, and its hours would pass for the GPU's."""
    if "wall_seconds" not in ok:
        return float("nan")
    one = (~ok["device"].astype(str).str.contains(JOINED, regex=False) if "device" in ok
           else pd.Series(True, index=ok.index))
    return ok.loc[one, "wall_seconds"].astype(float).mean() / 60


def _pixels(g: pd.DataFrame) -> str:
    """'official' or 're-encoded' (a lossy copy such as the JPEG tarball: absolute errors are not the paper's),
    both joined where the runs of a row differ; '' where the summaries predate the field."""
    flags = {bool(v) for v in g.get("official_pixels", pd.Series(dtype=object)).dropna()}
    return ", ".join(name for flag, name in ((True, "official"), (False, "re-encoded")) if flag in flags)


# Config fields that may differ between the runs of one table row: the seed, and how a run was computed
# (config.NON_RESULT_FIELDS: activation checkpointing recomputes the same forward; fast=False is the eager
# step the graph is checked against; compile=True is the same step through fused kernels, checked against
# the plain one), not what was trained.
SEED_LIKE = ("seed", *sorted(NON_RESULT_FIELDS))


def _plain_value(v: Any) -> Any:
    """A config value as one Python value, however the frame holds it: NaN and None alike, numpy scalars as
    Python ones, lists and tuples (milestones) as tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(_plain_value(x) for x in v)
    if hasattr(v, "item") and not isinstance(v, str):  # numpy scalar
        v = v.item()
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def check_seeds_only(frame: pd.DataFrame, by: Sequence[str], ignore: Iterable[str] = ()) -> None:
    """Refuse a frame whose groups by `by` are not seeds of one config, naming the fields that differ: a
    figure's line, band or bar averages each group as seeds. `ignore`: columns that only share a config
    field's name (a curve's `lr` is each evaluation's rate)."""
    if frame.empty:
        return
    by = list(dict.fromkeys(by))
    missing = [c for c in by if c not in frame]
    if missing:  # else every run would be one group, and the message would name a field, not the typo
        raise ValueError(f"no column {missing} to draw by: the frame has {sorted(map(str, frame.columns))}")
    groups = frame.groupby(by, sort=False, dropna=False) if by else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        _check_seeds_only(g, dict(zip(by, key)), ignore, what="line or bar",
                          hint="select one config's runs (by `hash`, say) or draw the differing field apart")


def _check_seeds_only(group: pd.DataFrame, key: dict[str, Any], ignore: Iterable[str] = (), what: str = "row",
                      hint: str = "add {differ} to `by` or select the runs first") -> None:
    """The runs of one row must be seeds of one config: averaging, say, option A with option C as if they
    were seeds would give a mean and CI of nothing. (The notebooks select runs by config hash; a frame
    from `load_runs(preset=...)` holds every variant.)"""
    from .config import RunConfig

    skip = set(SEED_LIKE) | set(key) | set(ignore)
    fields = [f for f in RunConfig.__dataclass_fields__ if f in group and f not in skip]
    values = {f: set(map(_plain_value, group[f])) for f in fields}  # 8 == 8.0 == np.int64(8): one value
    differ = [f for f in fields if len(values[f]) > 1]
    if differ:
        values = {f: sorted(map(str, values[f])) for f in differ}
        raise ValueError(f"the runs of {what} {key} differ in {values}: a {what} averages seeds of one config; "
                         + hint.format(differ=differ))


def _run_with_hooks(model: nn.Module, hooks, batches, max_images: int | None) -> None:
    """Forward uint8 batches in eval mode with read-only forward hooks; hooks and mode are restored."""
    from .data import normalize

    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    was = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x, _y in batches:
                if max_images is not None:
                    if seen >= max_images:
                        break
                    x = x[:max_images - seen]  # the last batch cut to the budget: stats over exactly max_images
                model(normalize(x))
                seen += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)


# -- layer responses (He et al. 2015, Fig. 7) ------------------------------------------------------------
def response_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN right after every 3x3 conv (stem and residual branches), in depth order; shortcut BNs excluded."""
    if getattr(model, "arch", None) == "preact":  # its BNs sit before the next conv, not after this one
        raise ValueError("arch='preact' is not supported by layer responses: use 'plain', 'resnet' or 'highway' "
                         "(He et al. 2015 Fig. 7 measures post-activation nets)")
    layers: list[nn.BatchNorm2d] = []
    seqs = [model.stem] + [b.branch for b in model.blocks]
    for seq in seqs:
        mods = list(seq)
        for prev, m in zip(mods, mods[1:]):
            if isinstance(m, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and prev.kernel_size == (3, 3):
                layers.append(m)
    return layers


def layer_responses(model: nn.Module, batches: Batches, max_images: int | None = None) -> pd.DataFrame:
    """Std of each 3x3 layer's BN output (before addition and ReLU) over the given images.

    Per channel, the std over images and positions; then the mean over channels (the layer's response
    strength). Forward hooks only read; the model's outputs and parameters do not change.
    Post-activation nets only: in pre-activation blocks BN comes before the conv (a preact net raises).
    """
    layers = response_layers(model)
    if not layers:
        raise ValueError("model has no conv3x3 -> BN pairs (pre-activation nets are not supported here)")
    stats = [None] * len(layers)

    def hook(i):
        def fn(_m, _inp, out):
            o = out.detach().double()
            s = (o.sum((0, 2, 3)), (o * o).sum((0, 2, 3)), o.shape[0] * o.shape[2] * o.shape[3])
            stats[i] = s if stats[i] is None else tuple(a + b for a, b in zip(stats[i], s))
        return fn

    _run_with_hooks(model, [(m, hook(i)) for i, m in enumerate(layers)], batches, max_images)
    rows = []
    for i, (s, ss, n) in enumerate(stats):
        var = (ss / n - (s / n) ** 2).clamp_min(0)
        rows.append({"layer": i + 1, "std": float(var.sqrt().mean()), "channels": len(s)})
    df = pd.DataFrame(rows)
    df["rank"] = df["std"].rank(ascending=False, method="first").astype(int)
    return df


# -- ImageNet architectures (He et al. 2015, Table 1) ----------------------------------------------------
IMAGENET_PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


def imagenet_model(depth: int, stride_on: str = "3x3") -> nn.Module:
    """torchvision's ImageNet ResNet (random init); stride_on='1x1' moves the bottleneck stride to the first
    1x1 conv, as in the paper (torchvision's 'v1.5' puts it on the 3x3)."""
    import torchvision

    if depth not in IMAGENET_PAPER_GMACS:
        raise ValueError(f"depth={depth!r} is not an ImageNet ResNet: use one of {sorted(IMAGENET_PAPER_GMACS)}")
    if stride_on not in ("3x3", "1x1"):
        raise ValueError(f"stride_on={stride_on!r} is not valid: use '3x3' (torchvision) or '1x1' (paper)")
    m = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if stride_on == "1x1" and depth >= 50:
        for layer in (m.layer2, m.layer3, m.layer4):
            b = layer[0]
            if b.conv2.stride != (1, 1):
                b.conv1.stride, b.conv2.stride = b.conv2.stride, (1, 1)
    return m


def imagenet_table(depths: list[int] = (18, 34, 50, 101, 152)) -> pd.DataFrame:
    """Parameters and multiply-adds at 224x224 for both stride placements, beside the paper's numbers."""
    rows = []
    for d in depths:
        tv = imagenet_model(d, "3x3")
        paper = imagenet_model(d, "1x1")
        rows.append({"depth": d, "params_M": count_params(tv) / 1e6,
                     "GMACs (torchvision, stride on 3x3)": count_macs(tv, 224) / 1e9,
                     "GMACs (paper, stride on 1x1)": count_macs(paper, 224) / 1e9,
                     "GMACs (He et al. Table 1, as reported)": IMAGENET_PAPER_GMACS[d]})
    return pd.DataFrame(rows)


def time_model(model: nn.Module, batch_size: int, device: str | torch.device = "cpu", image_size: int = 224,
               repeats: int = 3, backward: bool = False) -> float:
    """Median seconds per batch of forward (or forward+backward), after one warm-up pass."""
    import time

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not valid: use a positive integer")
    device = torch.device(device)
    model = model.to(device).train(backward)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = model(x)
            if backward:
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
    return float(statistics.median(times))  # of an even count, the mean of the middle two


def gate_means(model: nn.Module, batches: Batches, max_images: int | None = None) -> pd.DataFrame:
    """Mean gate value g(x) per block over the images. highway: the branch's share (0 = shortcut only,
    1 = branch only); gated: the shortcut is scaled by 1 - g (0 = a plain identity shortcut). Blocks are
    numbered from 0 in the net's order, as the lesion tables number them."""
    gated = [(i, b) for i, b in enumerate(model.blocks) if getattr(b, "gate", None) is not None]
    if not gated:
        raise ValueError("model has no gated blocks (arch 'highway' or 'gated')")
    sums = {i: 0.0 for i, _ in gated}
    counts = {i: 0 for i, _ in gated}

    def hook(i):
        def fn(_m, _inp, out):
            t = torch.sigmoid(out.detach().float())
            sums[i] += float(t.sum())
            counts[i] += t.numel()
        return fn

    _run_with_hooks(model, [(b.gate, hook(i)) for i, b in gated], batches, max_images)
    return pd.DataFrame({"block": [i for i, _ in gated], "mean_gate": [sums[i] / counts[i] for i, _ in gated]})
