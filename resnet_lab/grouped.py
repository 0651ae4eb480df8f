"""N nets of one architecture computed as one: convolutions with groups=N, channels side by side.

The other way to pack small runs on one GPU (besides one CUDA stream per run): BatchNorm, ReLU,
pooling and SGD with momentum and weight decay all act per channel or per element, so N nets whose
channels are laid side by side, with every convolution grouped by net, train independently in one
set of kernels instead of N. Whether that beats streams depends on how fast the GPU runs grouped
convolutions, which `resnet-lab bench --packs` measures side by side.

Member i's weights come back as a plain `CifarResNet` state dict (`member_state_dict`), so
everything downstream of training is unchanged.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models import Block, CifarResNet, ZeroPadShortcut

# Modules that pass N side-by-side nets through unchanged: containers and per-element ops.
_PASS_THROUGH = (CifarResNet, Block, nn.Sequential, nn.ModuleList, nn.Identity, nn.ReLU,
                 nn.AdaptiveAvgPool2d, nn.Flatten)


class GroupedLinear(nn.Module):
    """N linear layers in one: (B, N*in) -> (B, N*out). Weight (N*out, in), so member i is chunk i."""

    def __init__(self, n: int, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.n = n
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = self.weight.view(self.n, -1, self.weight.shape[1])  # (N, out, in)
        out = torch.einsum("bni,noi->bno", x.view(b, self.n, -1), w)  # (B, N, out)
        if self.bias is not None:
            out = out + self.bias.view(self.n, -1)
        return out.reshape(b, -1)


class GroupedZeroPad(nn.Module):
    """Option A's shortcut for N nets side by side: each net's channels are padded on their own."""

    def __init__(self, n: int, inner: ZeroPadShortcut):
        super().__init__()
        self.n, self.stride, self.extra = n, inner.stride, inner.extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N*cin, H, W) -> (B, N*cout, H/s, W/s)
        b, c, h, w = x.shape
        x = x.view(b, self.n, c // self.n, h, w)[..., :: self.stride, :: self.stride]
        lo = self.extra // 2
        x = F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))
        return x.reshape(b, -1, *x.shape[-2:])


def _cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach() for t in ts], 0).clone()


def _grouped_leaf(mods: list[nn.Module]) -> nn.Module | None:
    """The N-net version of one module (from its N copies), or None where the module passes through."""
    m, n = mods[0], len(mods)
    if isinstance(m, nn.Conv2d):
        g = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                      groups=n * m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                      device="meta", dtype=m.weight.dtype)  # no random init: its weights are replaced next,
        # and an init on the GPU would draw from (and advance) the CUDA generator, also while a capture is under way
        g.weight = nn.Parameter(_cat([k.weight for k in mods]))
        if m.bias is not None:
            g.bias = nn.Parameter(_cat([k.bias for k in mods]))
        return g
    if isinstance(m, nn.BatchNorm2d):
        ref = m.weight if m.affine else m.running_mean  # device and dtype (a float64 net stays float64)
        g = nn.BatchNorm2d(n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                           device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        sds = [mod.state_dict() for mod in mods]
        sd = {k: _cat([d[k] for d in sds]) for k in ("weight", "bias", "running_mean", "running_var") if k in sds[0]}
        if m.track_running_stats:
            sd["num_batches_tracked"] = m.num_batches_tracked.detach().clone()  # unused with momentum 0.1
        g.load_state_dict(sd)
        return g
    if isinstance(m, nn.Linear):
        return GroupedLinear(n, _cat([k.weight for k in mods]), None if m.bias is None else _cat([k.bias for k in mods]))
    if isinstance(m, ZeroPadShortcut):
        return GroupedZeroPad(n, m)
    if isinstance(m, _PASS_THROUGH):
        return None
    allowed = ", ".join(t.__name__ for t in (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ZeroPadShortcut) + _PASS_THROUGH)
    raise ValueError(f"cannot group a {type(m).__name__}: grouping knows {allowed}")


class CatLoader:
    """Member batches one after another on the batch dimension: the input `GroupedNets` takes."""

    def __init__(self, loaders: Sequence):
        self.loaders = list(loaders)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(ld.batch(step) for ld in self.loaders))
        return torch.cat(xs), torch.cat(ys)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times k backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.k, None


def _signature(model: nn.Module) -> list[tuple]:
    """Each submodule's name, type and settings (its plain attributes: a block's gating, pre-activation or
    lesion flags, a conv's stride): two nets of one signature compute the same function of their weights,
    which equal state-dict shapes alone do not say (a highway and a gated net have the same)."""
    plain = (bool, int, float, str, tuple, type(None))
    return [(name, type(m).__name__, sorted((k, v) for k, v in vars(m).items()
                                            if not k.startswith("_") and k != "training" and isinstance(v, plain)))
            for name, m in model.named_modules()]


def _difference(a: tuple, b: tuple) -> str:
    """'blocks.0 (Block: shortcut_gate_only False, not True)': where two signatures first part, in words
    (a's values, not b's)."""
    where = f"{a[0] or 'the net'} ({a[1]}" + ("" if a[1] == b[1] else f", not {b[1]}")
    mine, theirs = dict(a[2]), dict(b[2])
    keys = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k, "-") != theirs.get(k, "-")][:3]
    return where + (": " + ", ".join(f"{k} {mine.get(k, '-')!r}, not {theirs.get(k, '-')!r}" for k in keys)
                    if keys and a[1] == b[1] else "") + ")"


class GroupedNets(nn.Module):
    """N nets of one architecture as one module, stacked on the batch dimension at both ends.

    Input (N*B, 3, H, W): member i's batch is rows i*B..(i+1)*B. Output (N*B, classes), the same
    rows. The gradient is scaled by N, so the mean cross-entropy over all N*B rows gives each
    member the gradient of its own mean loss: one SGD step of the group is one step of each net.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("GroupedNets needs at least one model")
        self.n = len(models)
        names = [dict(m.named_modules()) for m in models]
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        first = _signature(models[0])
        for i, (s, m) in enumerate(zip(shapes[1:], models[1:]), 1):
            sig = _signature(m)
            differs = next((_difference(b, a) for a, b in zip(first, sig) if a != b), None) \
                or ("its layers" if len(sig) != len(first) else None)
            if s != shapes[0] or differs:  # one set of kernels runs member 0's code for every member
                raise ValueError(f"model {i} differs from model 0 in {differs or 'its shapes'}: only nets of one "
                                 "architecture (same arch, depth, shortcut, block, width) can be grouped")
        net = copy.deepcopy(models[0])
        for name, _ in list(net.named_modules()):
            new = _grouped_leaf([d[name] for d in names])
            if new is not None:
                parent, _, attr = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, attr, new)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N*B, C, H, W) -> (N*B, classes)
        n, b = self.n, x.shape[0] // self.n
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        x = x.view(n, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *x.shape[2:])  # (B, N*C, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)  # (B, N*classes)
        out = out.view(b, n, -1).transpose(0, 1).reshape(n * b, -1)
        return _ScaleGrad.apply(out, float(n)) if n > 1 else out

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights and BN statistics, keyed as the plain model's state dict."""
        if not 0 <= i < self.n:
            raise ValueError(f"member={i!r} is not valid: use 0..{self.n - 1}")
        return {k: v.detach().clone() if v.dim() == 0 else v.detach().chunk(self.n)[i].clone()
                for k, v in self.net.state_dict().items()}
