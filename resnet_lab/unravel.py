"""The unraveled view of residual networks (Veit, Wilber, Belongie 2016, "Residual Networks Behave
Like Ensembles of Relatively Shallow Networks").

A net of m residual blocks, each out = f(x) + x, unrolls into 2^m paths from input to output, one
per subset of blocks whose residual branch the path goes through; path lengths follow
Binomial(m, 1/2). The analyses here probe that ensemble at test time on a trained model:

  lesion_blocks            drop one block's residual branch (keep its shortcut), for every block;
  delete_k                 drop k random blocks' branches at once;
  reorder_k                swap k random pairs of same-shape blocks;
  gradient_by_path_length  input-gradient norm carried by paths of each length k;
  effective_paths          the range of path lengths that carries most of the gradient.

Everything acts through `model.blocks` and the `Block.lesioned` / `Block.route` flags, always
inside `modified_blocks`, which puts block order, flags and train/eval mode back afterwards (also
on exceptions). No parameter, buffer or `.grad` is ever changed.
"""
from __future__ import annotations

import itertools
import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import is_int
from .data import eval_batch_size, eval_batches, normalize
from .train import evaluate

ROUTES = ("branch", "shortcut")
PASS_IMAGES = 2048  # images in one pass of gradient_by_path_length on CUDA (ResNet-110: ~7 MB each in fp32)


# -- blocks -----------------------------------------------------------------------------------
def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's ordered block list, which every analysis here edits."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model has no block list (`.blocks`, an nn.ModuleList): got {type(model).__name__}; "
                         "use a net from resnet_lab.models.build_model")
    return blocks


def block_stages(blocks: Iterable[nn.Module]) -> list[int]:
    """Stage index of each block: a new stage starts at every shape-changing block after the first."""
    stages, stage = [], 0
    for i, b in enumerate(blocks):
        if i > 0 and b.changes_shape:
            stage += 1
        stages.append(stage)
    return stages


def _removable(block: nn.Module) -> bool:
    """A residual block can always lose its branch; a plain one only if it keeps the shape (identity)."""
    return block.has_shortcut or not block.changes_shape


@contextmanager
def modified_blocks(model: nn.Module, order: list[int] | None = None, lesion: Iterable[int] = frozenset(),
                    route: Mapping[int, str | torch.Tensor | None] | None = None) -> Iterator[nn.Module]:
    """Temporarily reorder/delete (`order`), lesion and route blocks, so analyses never leave the model changed.

    Indices in `order`, `lesion` and `route` all refer to the original block list; `order` may be
    shorter than it (the missing blocks are removed). On exit the original list, every block's
    `lesioned`/`route` flags and every module's train/eval mode are restored.
    """
    blocks = blocks_of(model)
    m = len(blocks)
    lesion, route = set(lesion), dict(route or {})
    for name, idx in (("order", order or []), ("lesion", lesion), ("route", route)):
        for i in idx:
            if not is_int(i) or not 0 <= i < m:
                raise ValueError(f"{name} has block index {i!r}; allowed: integers 0..{m - 1} ({m} blocks)")
    if order is not None and len(set(order)) != len(order):
        raise ValueError(f"order={order} repeats a block; each block index may appear at most once")
    for i, r in route.items():
        if isinstance(r, torch.Tensor):
            if r.dtype != torch.bool or r.dim() != 1:
                raise ValueError(f"route[{i}] is a {r.dtype} tensor of shape {tuple(r.shape)}; allowed: a 1-d bool "
                                 "tensor, one entry per image (True: branch)")
        elif r not in ROUTES and r is not None:
            raise ValueError(f"route[{i}]={r!r} is not valid; allowed: 'branch', 'shortcut', None, or a 1-d bool "
                             "tensor (per image, True: branch)")
    for i in sorted(lesion):
        if not _removable(blocks[i]):
            raise ValueError(f"lesion has block {i}, a plain block that changes the shape; "
                             "only blocks with a shortcut or of unchanged shape can be removed")
    flags = [(b.lesioned, b.route) for b in blocks]
    modes = {mod: mod.training for mod in model.modules()}
    try:
        for i in lesion:
            blocks[i].lesioned = True
        for i, r in route.items():
            blocks[i].route = r
        if order is not None:
            model.blocks = nn.ModuleList([blocks[i] for i in order])
        yield model
    finally:
        model.blocks = blocks
        for b, (lesioned, r) in zip(blocks, flags):
            b.lesioned, b.route = lesioned, r
        for mod, training in modes.items():
            mod.training = training


# -- validation -------------------------------------------------------------------------------
def _check_ks(ks: Iterable[int], limit: int, what: str) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError(f"ks is empty; give at least one k in 0..{limit} ({what})")
    for k in ks:
        if not is_int(k) or not 0 <= k <= limit:
            raise ValueError(f"k={k!r} is out of range; allowed: integers 0..{limit} ({what})")
    return [int(k) for k in ks]


def _check_count(name: str, n: int) -> None:
    if not is_int(n) or n <= 0:
        raise ValueError(f"{name}={n!r} is not valid; allowed: integers >= 1")


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as images, at least one: got {len(x)} images, {len(y)} labels")


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> float:
    """Test error rate via `train.evaluate`, batches moved to the model's device, no autograd graph.

    batch_size None: the model's device's evaluation batch (`data.eval_batch_size`)."""
    if batch_size is not None and (not is_int(batch_size) or batch_size <= 0):
        raise ValueError(f"batch_size={batch_size!r} is not valid; allowed: integers >= 1, or None")
    dev = next(model.parameters()).device
    batch_size = eval_batch_size(dev) if batch_size is None else batch_size
    with modified_blocks(model), torch.no_grad():  # evaluate() resets every module to the top-level mode
        return evaluate(model, ((a.to(dev), b.to(dev)) for a, b in eval_batches(x, y, batch_size)))[1]


# -- test-time deletion and reordering ----------------------------------------------------------
def lesion_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> pd.DataFrame:
    """Test error with each single block's residual branch removed: does the net depend on any one block?

    Columns: block, stage, changes_shape, has_shortcut, err, base_err (the unlesioned error). For a
    plain net the block itself is removed (identity) where its shape allows; err is NaN where it
    changes the shape.
    """
    _check_data(x, y)
    blocks = blocks_of(model)
    base = _error(model, x, y, batch_size)
    rows = []
    for i, (b, stage) in enumerate(zip(blocks, block_stages(blocks))):
        err = math.nan
        if _removable(b):
            with modified_blocks(model, lesion={i}):
                err = _error(model, x, y, batch_size)
        rows.append(dict(block=i, stage=stage, changes_shape=b.changes_shape, has_shortcut=b.has_shortcut,
                         err=err, base_err=base))
    return pd.DataFrame(rows)


def delete_k(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: Iterable[int], draws: int, seed: int = 0,
             batch_size: int | None = None) -> pd.DataFrame:
    """Test error after lesioning k random blocks at once: how smoothly error grows with k.

    `draws` distinct sets of k blocks per k (all C(n, k) where there are fewer), from the n blocks that
    can be removed (every block of a residual net). Columns: k, draw, blocks (the lesioned indices),
    err; k=0 is the unlesioned error.
    """
    _check_data(x, y)
    blocks = blocks_of(model)
    pool = [i for i, b in enumerate(blocks) if _removable(b)]
    ks = _check_ks(ks, len(pool), f"the number of removable blocks is {len(pool)}")

    def draw(rng: random.Random, k: int) -> tuple[Any, dict]:
        chosen = _subset(rng, pool, k)
        return chosen, {"lesion": chosen}

    return _draw_errors(model, x, y, ks, draws, seed, batch_size, "blocks", draw, lambda k: math.comb(len(pool), k))


def _subset(rng: random.Random, pool: list[int], k: int) -> tuple[int, ...]:
    """k of the pool's blocks at random, sorted: the label a draw is known by."""
    return tuple(sorted(rng.sample(pool, k)))


def _rng(seed: int, k: int) -> random.Random:
    """One random stream per k: the draws for a k are the same whichever other ks are asked."""
    return random.Random(seed * 1_000_003 + k)


def _distinct(rng: random.Random, draw: Callable[[random.Random, int], tuple[Any, Any]], k: int,
              seen: set) -> tuple[Any, Any]:
    """draw(rng, k) again until it gives a label not in `seen` (the caller knows an unseen one exists)."""
    while True:
        label, change = draw(rng, k)
        if label not in seen:
            seen.add(label)
            return label, change


def _draw_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: list[int], draws: int, seed: int,
                 batch_size: int | None, column: str, draw: Callable[[random.Random, int], tuple[Any, dict]],
                 count: Callable[[int], int]) -> pd.DataFrame:
    """Test error of `draws` distinct random modifications per k, or of all count(k) of them where there are
    fewer (the same modification twice is the same error: it would narrow the spread, not measure it);
    draw(rng, k) -> (what was drawn, for the `column` column; `modified_blocks` arguments). k=0 is the
    unmodified error, one row."""
    _check_count("draws", draws)
    base = _error(model, x, y, batch_size)
    rows = []
    for k in ks:
        rng, seen = _rng(seed, k), set()
        for d in range(min(draws, count(k))):
            label, change = _distinct(rng, draw, k, seen)
            if k == 0:
                err = base
            else:
                with modified_blocks(model, **change):
                    err = _error(model, x, y, batch_size)
            rows.append({"k": k, "draw": d, column: label, "err": err})
    return pd.DataFrame(rows)


def swappable_groups(model: nn.Module) -> list[list[int]]:
    """Per stage, the blocks that may trade places: same input and output shape (no transition block),
    and no pre-activation shared before the split (a pre-act net's first block holds the BN-ReLU of
    conv1's output, which moved elsewhere would normalise another block's output with its statistics)."""
    blocks = blocks_of(model)
    groups: dict[int, list[int]] = {}
    for i, (b, stage) in enumerate(zip(blocks, block_stages(blocks))):
        if not b.changes_shape and getattr(b, "pre", None) is None:
            groups.setdefault(stage, []).append(i)
    return [g for g in groups.values() if len(g) >= 2]


def reorder_k(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: Iterable[int], draws: int, seed: int = 0,
              batch_size: int | None = None) -> pd.DataFrame:
    """Test error after swapping k random disjoint pairs of same-shape blocks: how much block order matters.

    Pairs come from the same stage and never include a transition block or a pre-act net's first
    block (`swappable_groups`), drawn by `draw_pairs`; `draws` distinct sets of pairs per k, or all
    of them where there are fewer. k is at most the number of disjoint such pairs (sum over stages of
    swappable blocks // 2). Columns: k, draw, pairs, kendall_tau (of the new block order against the
    original: Veit et al. Fig. 5(b) plot the error against it), err; k=0 is the unmodified error.
    """
    _check_data(x, y)
    m = len(blocks_of(model))
    groups = swappable_groups(model)
    limit = sum(len(g) // 2 for g in groups)
    ks = _check_ks(ks, limit, f"the number of disjoint same-stage pairs of non-transition blocks is {limit}")

    def draw(rng: random.Random, k: int) -> tuple[Any, dict]:
        pairs = draw_pairs(rng, groups, k)
        return pairs, {"order": swapped_order(m, pairs)}

    df = _draw_errors(model, x, y, ks, draws, seed, batch_size, "pairs", draw, lambda k: _pairings(groups, k))
    df.insert(3, "kendall_tau", [kendall_tau(swapped_order(m, p)) for p in df["pairs"]])
    return df


def swapped_order(m: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """The order of m blocks after swapping each pair's places."""
    order = list(range(m))
    for a, b in pairs:
        order[a], order[b] = order[b], order[a]
    return order


def kendall_tau(order: list[int]) -> float:
    """Kendall's tau between `order` and 0..m-1: 1 - 4 * inversions / (m (m - 1)); 1 for the original order."""
    m = len(order)
    if m < 2:
        return 1.0
    inversions = sum(order[i] > order[j] for i in range(m) for j in range(i + 1, m))
    return 1 - 4 * inversions / (m * (m - 1))


def draw_pairs(rng: random.Random, groups: list[list[int]], k: int) -> tuple[tuple[int, int], ...]:
    """k disjoint pairs, each uniform over the same-group pairs of blocks not paired yet (sorted)."""
    free = [list(g) for g in groups]
    pairs = []
    for _ in range(k):
        a, b = rng.choice([(a, b) for g in free for j, a in enumerate(g) for b in g[j + 1:]])
        pairs.append((a, b))
        for g in free:
            if a in g:
                g.remove(a), g.remove(b)
    return tuple(sorted(pairs))


def _pairings(groups: list[list[int]], k: int) -> int:
    """How many sets of k disjoint pairs, each inside one group, there are."""
    ways = [1]  # ways[j]: sets of j pairs over the groups so far
    for g in groups:
        # j pairs inside a group of n: choose their 2j blocks, then pair them up ((2j-1)!! ways)
        inside = [math.comb(len(g), 2 * j) * math.prod(range(1, 2 * j, 2)) for j in range(len(g) // 2 + 1)]
        ways = [sum(ways[i] * inside[j - i] for i in range(len(ways)) if 0 <= j - i < len(inside))
                for j in range(len(ways) + len(inside) - 1)]
    return ways[k] if k < len(ways) else 0


# -- paths --------------------------------------------------------------------------------------
def path_length_distribution(m: int) -> pd.DataFrame:
    """How many of the 2^m unraveled paths have each length k: C(m, k), i.e. Binomial(m, 1/2).

    Columns: k, paths (exact Python ints, object dtype, so they sum to 2^m for any m), share
    (C(m,k) / 2^m as a float).
    """
    if not is_int(m) or m < 0:
        raise ValueError(f"m={m!r} is not valid; allowed: integers >= 0 (the number of residual blocks)")
    m = int(m)
    total = 2**m
    paths = [math.comb(m, k) for k in range(m + 1)]
    return pd.DataFrame({"k": list(range(m + 1)), "paths": pd.Series(paths, dtype=object),
                         "share": [p / total for p in paths]})


def gradient_by_path_length(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: Iterable[int], samples: int,
                            seed: int = 0, batch: int | None = None, per_pass: int | None = None) -> pd.DataFrame:
    """Input-gradient norm carried by single paths of length k, and by all C(m,k) of them: which lengths train the net.

    Veit et al.'s scheme: for each k and sample, draw k of the m blocks (a path not measured yet for
    this k, until all C(m,k) have been; then round again, on new batches when `batch` is given); in the
    backward pass the gradient goes only through the residual branch of those k blocks and only through the
    shortcut of the others (`Block.route`; forward values are unchanged), so it follows exactly
    one path of length k. With the model in eval mode (BN on running statistics), compute the mean
    cross-entropy on a batch of uint8 images with labels, backpropagate and record the norm of the
    gradient w.r.t. the normalised float input. batch=None: every sample uses all of (x, y);
    batch=B: each sample draws its own B images from (x, y), as Veit et al. drew a random training
    batch per measurement. Multiplying the mean norm per k by the number of
    such paths, C(m,k), estimates the total gradient magnitude that paths of length k carry.

    per_pass: samples measured in one forward and backward pass, each on its own images and route (in eval
    mode no image affects another's gradient, so the norms are those of one pass each, up to rounding).
    A pass of one sample backpropagates through its k branches only, one of several through every branch
    some sample takes: on the CPU, bound by arithmetic, that costs more than it saves, while a GPU is bound
    by launching each layer's kernels, 5,500 times for a 110-layer net's 100 samples per length. None: 1 on
    the CPU, on CUDA as many as hold PASS_IMAGES images (halved while memory runs out).

    Columns: k, sample, blocks (the branch blocks), grad_norm, and per k: mean_grad_norm, paths
    (C(m,k) as float), total (= mean_grad_norm * paths). Parameter `.grad`s are left untouched.
    """
    _check_data(x, y)
    blocks = blocks_of(model)
    m = len(blocks)
    plain = [i for i, b in enumerate(blocks) if not b.has_shortcut]
    if plain:
        raise ValueError(f"gradient_by_path_length needs residual blocks; blocks {plain[:5]} have no shortcut")
    gated = [i for i, b in enumerate(blocks) if b.gate is not None]
    if gated:  # T(x) mixes both sides, so a path's gradient also flows through the gate: no single path
        raise ValueError(f"gradient_by_path_length needs ungated residual blocks (resnet, preact); "
                         f"blocks {gated[:5]} are gated (highway or gated)")
    ks = _check_ks(ks, m, f"the number of blocks is {m}")
    _check_count("samples", samples)
    if batch is not None:
        _check_count("batch", batch)
        if batch > len(y):
            raise ValueError(f"batch={batch!r} is not valid: use at most the {len(y)} images given, or None")
    if per_pass is not None:
        _check_count("per_pass", per_pass)
    dev = next(model.parameters()).device
    x, y = x.to(dev), y.to(dev)
    draws = []  # (k, sample, branch blocks, image indices or None), drawn in the order one pass each drew them
    for k in ks:
        rng, seen = _rng(seed, k), set()
        for s in range(samples):
            if len(seen) == math.comb(m, k):  # every path of this length measured: go round again (new batches)
                seen.clear()
            chosen, _ = _distinct(rng, lambda r, k: (_subset(r, list(range(m)), k), None), k, seen)
            idx = None if batch is None else torch.tensor(rng.sample(range(len(y)), batch), device=dev)
            draws.append((k, s, chosen, idx))
    if per_pass is None:
        per_pass = 1 if dev.type == "cpu" else max(1, PASS_IMAGES // (len(y) if batch is None else batch))
    norms: list[float] = []
    while len(norms) < len(draws):
        part = draws[len(norms):len(norms) + per_pass]
        try:
            norms += _path_grad_norms(model, x, y, m, part)
            continue
        except torch.cuda.OutOfMemoryError:
            if per_pass == 1:
                raise
        per_pass //= 2  # the failed pass's tensors are gone once the exception is: its memory can go back
        torch.cuda.empty_cache()
    df = pd.DataFrame([dict(k=k, sample=s, blocks=chosen, grad_norm=n) for (k, s, chosen, _), n in zip(draws, norms)])
    df["mean_grad_norm"] = df.groupby("k")["grad_norm"].transform("mean")
    df["paths"] = [float(math.comb(m, k)) for k in df["k"]]
    df["total"] = df["mean_grad_norm"] * df["paths"]
    return df


def _path_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int,
                     draws: list[tuple[int, int, tuple[int, ...], torch.Tensor | None]]) -> list[float]:
    """One pass for these draws: each one's images routed through its own branch blocks; each one's norm of the
    gradient of its mean loss w.r.t. its normalised images."""
    xs = [x if idx is None else x[idx] for *_, idx in draws]
    ys = [y if idx is None else y[idx] for *_, idx in draws]
    route: dict[int, str | torch.Tensor] = {}
    for i in range(m):
        on = [i in chosen for _, _, chosen, _ in draws]
        if all(on) or not any(on):  # one side for every image: the other side's backward is skipped
            route[i] = "branch" if on[0] else "shortcut"
        else:
            route[i] = torch.cat([torch.full((len(v),), o, dtype=torch.bool, device=x.device) for v, o in zip(ys, on)])
    xn = normalize(xs[0] if len(xs) == 1 else torch.cat(xs)).requires_grad_(True)
    ends = list(itertools.accumulate(len(v) for v in ys))
    spans = list(zip([0] + ends[:-1], ends))
    with modified_blocks(model, route=route), torch.enable_grad():
        model.eval()
        out = model(xn).float()
        loss = sum(F.cross_entropy(out[a:b], v) for (a, b), v in zip(spans, ys))  # each draw's own mean
        (g,) = torch.autograd.grad(loss, xn)
    return torch.stack([g[a:b].norm() for a, b in spans]).tolist()


def effective_paths(grad_df: pd.DataFrame, mass: float = 0.9) -> tuple[int, int]:
    """Shortest range [lo, hi] of measured path lengths holding `mass` of the total gradient: the effective paths.

    Uses `total` per k from `gradient_by_path_length`; ranges run over the k values present.
    Among equally short ranges the one with the most gradient wins.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass!r} is not valid; allowed: 0 < mass <= 1")
    if len(grad_df) == 0 or not {"k", "total"} <= set(grad_df.columns):
        raise ValueError("grad_df must be a non-empty frame from gradient_by_path_length (columns k, total)")
    per_k = grad_df.groupby("k")["total"].first().sort_index()
    ks, totals = [int(k) for k in per_k.index], [float(t) for t in per_k]
    need = mass * sum(totals) * (1 - 1e-12)  # tolerate rounding in the sums
    best: tuple[int, float, int, int] | None = None  # (width, -mass, lo, hi)
    for a in range(len(ks)):
        acc = 0.0
        for b in range(a, len(ks)):
            acc += totals[b]
            if acc >= need:
                cand = (ks[b] - ks[a], -acc, ks[a], ks[b])
                best = cand if best is None or cand < best else best
                break
    assert best is not None
    return best[2], best[3]
