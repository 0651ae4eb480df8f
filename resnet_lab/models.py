"""The CIFAR ResNet family of He et al. (2015, 2016): plain / residual / pre-activation / gated shortcuts.

Every net is stem -> ordered list of blocks -> head, and `model.blocks` is that list, so the
unraveled-ensemble analyses can delete, reorder or re-route blocks without knowing their kind.

Parameter counts (option A, width 16), which `tests/test_models.py` checks:

    ResNet-20   269,722      ResNet-44   658,586      ResNet-110  1,727,962
    ResNet-32   464,154      ResNet-56   853,018      ResNet-1202 19,421,274
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ARCHS, GATED_ARCHS, SHORTCUTS, RunConfig, _check_choice, check_depth, default_gate_bias, is_int


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity that subsamples by the stride and zero-pads the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            lo = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))
        return x


def make_shortcut(kind: str, cin: int, cout: int, stride: int, with_bn: bool = True) -> nn.Module:
    """A: zero-pad identity; B: projection only when the shape changes; C: projection always."""
    changes = stride != 1 or cin != cout
    if kind == "C" or (kind == "B" and changes):
        layers: list[nn.Module] = [conv1x1(cin, cout, stride)]
        if with_bn:
            layers.append(nn.BatchNorm2d(cout))
        return nn.Sequential(*layers)
    return ZeroPadShortcut(cin, cout, stride) if changes else nn.Identity()


class Block(nn.Module):
    """One block: out = post(branch(x) + shortcut(x)), or gated: with g = sigmoid(gate(x)),
    T*F(x) + (1-T)*s(x) (highway, "exclusive gating") or F(x) + (1-g)*s(x) (`shortcut_gate_only`,
    He et al. 2016's "shortcut-only gating").

    `pre` (pre-activation nets only): BN-ReLU applied before the split, shared by branch and
    shortcut, for the first block after conv1 and for projection shortcuts (He et al. 2016, appendix).

    Flags the analyses set at test time (they never change parameters):
      lesioned -- drop the residual branch, keep the shortcut (Veit et al.'s deletion; a gated
                  block keeps its gate on the shortcut); a post-activation block keeps its ReLU
                  after the (now one-term) sum;
      route    -- "branch" or "shortcut": let the gradient through only that side
                  (forward values unchanged), for gradient-by-path-length; or a bool tensor with
                  one entry per image of the batch (True: branch), so that one pass measures
                  several paths, each on its own images (independent only in eval mode, where
                  BatchNorm uses its running statistics).
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None, post_relu: bool,
                 gate: nn.Module | None = None, changes_shape: bool = False, pre: nn.Module | None = None,
                 shortcut_gate_only: bool = False):
        super().__init__()
        self.pre, self.branch, self.shortcut, self.gate = pre, branch, shortcut, gate
        self.shortcut_gate_only = shortcut_gate_only
        self.post_relu, self.changes_shape = post_relu, changes_shape
        self.lesioned = False
        self.route: str | torch.Tensor | None = None

    @property
    def has_shortcut(self) -> bool:
        return self.shortcut is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        if self.lesioned:
            if self.shortcut is None:
                if self.changes_shape:
                    raise ValueError("cannot delete a plain block that changes the shape")
                return x
            s = self.shortcut(x)
            if self.gate is not None:
                s = (1 - torch.sigmoid(self.gate(x))) * s
            return F.relu(s) if self.post_relu else s
        f = self.branch(x)
        if self.shortcut is None:  # plain net: no addition
            return F.relu(f) if self.post_relu else f
        s = self.shortcut(x)
        r = self.route
        mask = None
        if isinstance(r, torch.Tensor):  # per image: True takes the branch
            if r.shape != (len(x),):
                raise ValueError(f"route is a tensor of shape {tuple(r.shape)} for a batch of {len(x)} images: "
                                 "give one entry per image")
            mask = r.view(-1, 1, 1, 1)
        if mask is not None:  # the values of both sides are kept; each image's gradient goes through its side only
            s, f = torch.where(mask, s.detach(), s), torch.where(mask, f, f.detach())
        elif r == "branch":
            s = s.detach()
        elif r == "shortcut":
            f = f.detach()
        if self.gate is not None:  # highway: T*F(x) + (1-T)*x; shortcut-only: F(x) + (1-g)*x
            t = torch.sigmoid(self.gate(x))
            if mask is not None:
                t = torch.where(mask, t, t.detach())
            elif r == "shortcut":
                t = t.detach()
            out = (f if self.shortcut_gate_only else t * f) + (1 - t) * s
        else:
            out = f + s
        return F.relu(out) if self.post_relu else out


def _bn_stats_kept_on_recompute(group: nn.Module) -> Callable[[], tuple]:
    """checkpoint's context_fn: the backward pass re-runs the group's forward, whose BatchNorm layers
    would update their running statistics a second time; put them back as the forward left them."""

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        bns = [m for m in group.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.training and m.track_running_stats]
        with torch.no_grad():
            saved = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, (mean, var, n) in zip(bns, saved):
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)

    return lambda: (contextlib.nullcontext(), restore())


def _preact(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=False)]


def _basic_branch(cin: int, cout: int, stride: int, layers: int, preact: bool,
                  shared_pre: bool = False) -> nn.Sequential:
    """k 3x3 conv layers; post-act: conv-BN(-ReLU) ... conv-BN; pre-act: BN-ReLU-conv ...
    (shared_pre: the first BN-ReLU sits before the split, in `Block.pre`)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        c_in, s = (cin, stride) if i == 0 else (cout, 1)
        if preact:
            mods += ([] if i == 0 and shared_pre else _preact(c_in)) + [conv3x3(c_in, cout, s)]
        else:
            mods += [conv3x3(c_in, cout, s), nn.BatchNorm2d(cout)]
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


def _bottleneck_branch(cin: int, mid: int, cout: int, stride: int, preact: bool,
                       shared_pre: bool = False) -> nn.Sequential:
    """1x1 reduce - 3x3 - 1x1 expand, the stride on the first 1x1 as in He et al. 2016's ResNet-164/1001 code
    (and He et al. 2015's ImageNet bottleneck; torchvision's "v1.5" puts it on the 3x3)."""
    convs = [conv1x1(cin, mid, stride), conv3x3(mid, mid), conv1x1(mid, cout)]
    ins = [cin, mid, mid]
    mods: list[nn.Module] = []
    for i, conv in enumerate(convs):
        if preact:
            mods += ([] if i == 0 and shared_pre else _preact(ins[i])) + [conv]
        else:
            mods += [conv, nn.BatchNorm2d(conv.out_channels)]
            if i < 2:
                mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class CifarResNet(nn.Module):
    """stem (3x3 conv, 16 filters) -> blocks over three stages (16/32/64 filters on 32/16/8 maps) -> pool -> fc."""

    def __init__(self, arch: str = "resnet", depth: int = 20, shortcut: str = "A", block_layers: int = 2,
                 bottleneck: bool = False, width: int = 16, gate_bias: float | None = None, num_classes: int = 10,
                 activation_checkpointing: int = 0):
        super().__init__()
        _check_choice("arch", arch, ARCHS)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        n = check_depth(depth, block_layers, bottleneck)
        self.arch, self.depth = arch, depth
        self.activation_checkpointing = activation_checkpointing
        preact = arch == "preact"
        gate_bias = default_gate_bias(arch) if gate_bias is None else gate_bias
        expansion = 4 if bottleneck else 1
        stem: list[nn.Module] = [conv3x3(3, width)]
        if not preact:
            stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)

        blocks: list[Block] = []
        cin = width
        per_stage = n if bottleneck else 2 * n // block_layers
        for stage in range(3):
            mid = width * 2**stage
            cout = mid * expansion
            for i in range(per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                changes = stride != 1 or cin != cout
                sc = None if arch == "plain" else make_shortcut(shortcut, cin, cout, stride, with_bn=not preact)
                # He et al. 2016: the first unit after conv1, and projection shortcuts, take the
                # activation before the split
                projection = shortcut == "C" or (shortcut == "B" and changes)
                shared_pre = preact and (not blocks or projection)
                if bottleneck:
                    branch = _bottleneck_branch(cin, mid, cout, stride, preact, shared_pre)
                else:
                    branch = _basic_branch(cin, cout, stride, block_layers, preact, shared_pre)
                gate = None
                if arch in GATED_ARCHS:  # g(x) = sigmoid(1x1 conv(x) + b)
                    gate = nn.Conv2d(cin, cout, 1, stride=stride, bias=True)
                    nn.init.constant_(gate.bias, gate_bias)
                pre = nn.Sequential(*_preact(cin)) if shared_pre else None
                blocks.append(Block(branch, sc, post_relu=not preact, gate=gate, changes_shape=changes, pre=pre,
                                    shortcut_gate_only=arch == "gated"))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        head: list[nn.Module] = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)] if preact else []
        head += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        self.head = nn.Sequential(*head)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015: Kaiming-normal convs; BN starts as the identity. A gate's 1x1 conv starts at zero
        # weights, so every gate opens at exactly sigmoid(b) whatever its input: He et al. 2016 (Sec. 3.1) rest
        # shortcut-only gating on 1 - g ~ 1 at b = -6. Kaiming weights would spread the logit by the block
        # input's scale, which grows with depth (sigmoid is convex there: gated-110's mean gate opened at up
        # to 0.13, not 0.0025, damping the identity path 20x over 54 blocks). W_g still learns (its gradient
        # is the input's, not zero).
        gates = {id(b.gate) for b in self.blocks if b.gate is not None}  # their bias is b, set where built
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if id(m) in gates:
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        x = self.stem(x)  # (B, 16, 32, 32)
        seg = self.activation_checkpointing
        if seg and self.training and torch.is_grad_enabled():
            # Recompute groups of blocks in the backward pass: memory ~ one group, not the whole net.
            blocks = list(self.blocks)
            size = max(1, -(-len(blocks) // (3 * seg)))
            for i in range(0, len(blocks), size):
                group = nn.Sequential(*blocks[i:i + size])
                x = checkpoint(group, x, use_reentrant=False, preserve_rng_state=False,  # no dropout here
                               context_fn=_bn_stats_kept_on_recompute(group))
        else:
            for block in self.blocks:
                x = block(x)  # (B, 16|32|64, 32|16|8, 32|16|8)
        return self.head(x)


def build_model(arch: str = "resnet", depth: int = 20, shortcut: str = "A", block_layers: int = 2,
                bottleneck: bool = False, width: int = 16, gate_bias: float | None = None,
                activation_checkpointing: int = 0) -> CifarResNet:
    """The paper's CIFAR-10 net of the given kind. A bad arch, shortcut, depth, block_layers or width raises a
    ValueError naming the valid ones; the other arguments are checked only by a RunConfig (build a net from
    one, with `model_from_config`, to have every value checked)."""
    if not is_int(width) or width <= 0:  # torch: a raw error, or a 0-channel net
        raise ValueError(f"width={width!r} is not valid: use a positive integer (the first stage's channels)")
    return CifarResNet(arch, depth, shortcut, block_layers, bottleneck, width, gate_bias,
                       activation_checkpointing=activation_checkpointing)


def model_from_config(cfg: RunConfig) -> CifarResNet:
    """The model a `RunConfig` describes."""
    return build_model(cfg.arch, cfg.depth, cfg.shortcut, cfg.block_layers, cfg.bottleneck, cfg.width,
                       cfg.gate_bias, cfg.activation_checkpointing)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the number the paper's tables report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
