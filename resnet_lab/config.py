"""One frozen `RunConfig` per training run, the presets, and the stable hash that names its folder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ARCHS = ("plain", "resnet", "preact", "highway", "gated")
# Gate bias at initialisation, sigmoid(b) = the gate's opening. highway (exclusive gating, T*F + (1-T)*x):
# -2, so T = 0.12 and blocks start near the identity. gated (shortcut-only gating, F + (1-g)*x; He et
# al. 2016, Table 1): -6, the bias of their 6.91% (bias 0 gave 12.86%). Other archs keep -2, unused,
# so that their hashes stay those of before the field had a per-arch default.
GATE_BIAS = {"gated": -6.0}
GATED_ARCHS = ("highway", "gated")
DEFAULT_GATE_BIAS = -2.0
SHORTCUTS = ("A", "B", "C")
BLOCK_LAYERS = (1, 2, 3)
SPLITS = ("full", "45k5k")
PAD_FILLS = ("mean", "black")  # what the random crop's padding is filled with (data.augment)
SPLIT_IMAGES = {"full": (50_000, 10_000), "45k5k": (45_000, 5_000)}  # (training, evaluation) images of CIFAR-10
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # fp16: with a dynamic loss scale (fast.LossScaler)
FLOAT_FIELDS = ("lr", "momentum", "weight_decay", "warmup_lr", "warmup_err")  # stored as floats whatever was given
WARMUP_ERR = 0.80  # the warm-up's end: training error below 80% (He et al. 2015, ResNet-110)
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # what --device, train(device=) and a notebook's `device` take
MAX_SEED = 2**32  # the loader's seeds (seed * 1_000_003 + epoch) must stay inside a 64-bit integer

# Fields that change how fast a run goes or how much memory it takes, never what it learns:
# they are left out of the hash so a run trained with them is found by a run asked without.
NON_RESULT_FIELDS = frozenset({"activation_checkpointing", "fast", "compile"})

# Fields that change results, added to RunConfig after runs were stored: {field: the value every earlier run
# had} (usually the field's default). At that value a field is left out of the hash, so the runs stored before it
# existed keep their folders (and are found by a config asking for it); any other value is hashed as usual. A
# config.json (or `load_runs` row) without the field reads as that value, even where the default is another:
# pad_fill's is "mean" since session 24, and every run before padded black. A new result field goes here, and
# into tests/test_config.py's OTHER_VALUE (README: Extending).
ADDED_FIELDS: dict[str, Any] = {"pad_fill": "black"}

# Bumped when `models.py` changes what an architecture computes, so that runs stored from the old
# net hash to other folders and are not reused (an arch missing here is at revision 1, and its
# hashes are those of before this table existed). preact 2: BN-ReLU before the split in the first
# block and at projection shortcuts (He et al. 2016, appendix). highway and gated 2: the gates' 1x1 convs start at
# zero weights, so every gate opens at exactly sigmoid(gate_bias).
MODEL_REVISIONS = {"preact": 2, "highway": 2, "gated": 2}
# The same for bottleneck blocks of any arch (a net without them keeps its hash). 2: the stride moved from the
# 3x3 to the first 1x1 (He et al. 2016's code).
BOTTLENECK_REVISION = 2


def is_int(v: object) -> bool:
    """An integer, numpy's too, and not a bool (True passes `isinstance(v, int)` and `v >= 1`)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float, not a bool: what a size in MiB may be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_device(device: object) -> str:
    """`device` if it names auto, cpu, cuda or cuda:N, else a ValueError naming it (torch's own error lists twenty
    device kinds, and comes late: after the data loaded, or inside a notebook)."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ValueError(f"device={device!r} is not valid: use auto, cpu, cuda or cuda:N")
    return device


def valid_depths(block_layers: int = 2) -> list[int]:
    """Depths 6n+2 the CIFAR family accepts with blocks of this many layers, up to 1300 (the list error messages
    show; `check_depth` takes any); bottleneck blocks take 9n+2 (`check_depth` says so)."""
    return [6 * n + 2 for n in range(1, 1300 // 6 + 1) if (2 * n) % block_layers == 0]


def check_depth(depth: int, block_layers: int = 2, bottleneck: bool = False) -> int:
    """Return n (blocks' worth of layers per stage) or raise a ValueError naming the valid form."""
    if isinstance(block_layers, bool) or not isinstance(block_layers, int):  # 2.0 or True pass `in` and `!=`
        raise ValueError(f"block_layers={block_layers!r} is not valid: use one of {list(BLOCK_LAYERS)}")
    if bottleneck:
        if block_layers != 2:
            raise ValueError(f"block_layers={block_layers!r} is not valid for bottleneck blocks, which have 3 layers "
                             "by construction: leave block_layers=2")
        if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
            raise ValueError(
                f"depth={depth!r} is not valid for bottleneck blocks: use 9n+2 with n >= 1 (11, 20, 29, 56, 110, 164, ...)"
            )
        return (depth - 2) // 9
    if block_layers not in BLOCK_LAYERS:
        raise ValueError(f"block_layers={block_layers!r} is not valid: use one of {list(BLOCK_LAYERS)}")
    if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0) or ((depth - 2) // 3) % block_layers:
        ok = ", ".join(str(d) for d in valid_depths(block_layers)[:8])  # 2n = (depth - 2) / 3 layers per stage
        what = "" if block_layers == 2 else f" with {block_layers}-layer blocks (block_layers={block_layers})"
        rule = "6n+2 with n >= 1" + ("" if block_layers == 2 else f" and 2n divisible by {block_layers}")
        raise ValueError(f"depth={depth!r} is not valid{what}: use {rule}; depths that work: {ok}, ...")
    return (depth - 2) // 6


def default_gate_bias(arch: str) -> float:
    """The gate bias a highway or gated net starts with unless told otherwise (see GATE_BIAS)."""
    return GATE_BIAS.get(arch, DEFAULT_GATE_BIAS)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid: use one of {list(allowed)}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what one training run learns; its hash names `results/runs/<hash>/`."""

    preset: str = "custom"
    # model
    arch: str = "resnet"
    depth: int = 20
    block_layers: int = 2
    shortcut: str = "A"
    bottleneck: bool = False
    width: int = 16
    gate_bias: float | None = None  # highway and gated only; None: the arch's default (GATE_BIAS)
    # data
    dataset: str = ""  # sha256 prefix of the CIFAR-10 copy; filled in by `train` from the source
    split: str = "full"  # "full" = 50k train / 10k test; "45k5k" = 45k train / 5k val held out of train
    pad_fill: str = "mean"  # the crop's 4-pixel border: "mean" colour (the paper's zero after mean subtraction)
    # or "black" (torchvision's RandomCrop(32, padding=4) before Normalize; every run stored before session 24)
    train_subset: int | None = None  # first N images of a fixed class-balanced permutation
    eval_subset: int | None = None  # evaluate on a class-balanced N of the test (or val) images
    # optimisation (He et al. 2015: SGD, batch 128, lr 0.1, /10 at 32k and 48k, stop at 64k)
    iterations: int = 64_000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (32_000, 48_000)
    warmup_lr: float | None = None  # ResNet-110/1202: lr 0.01 until training error < warmup_err
    warmup_err: float = WARMUP_ERR
    eval_every: int = 1_000
    seed: int = 0
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU; or fp32, bf16, fp16 (loss-scaled)
    # speed only (not hashed)
    activation_checkpointing: int = 0  # number of segments per stage; 0 = off
    fast: bool = True  # the step as a captured CUDA graph where available; falls back to eager
    compile: bool = False  # the forward through torch.compile (fewer, fused kernels); kept only if it agrees

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy integers (from a DataFrame row) as plain ints
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
                object.__setattr__(self, f.name, int(v))
            elif isinstance(v, np.bool_):  # numpy's (a DataFrame row's) as Python's
                object.__setattr__(self, f.name, bool(v))
        object.__setattr__(self, "milestones", tuple(
            int(m) if isinstance(m, numbers.Integral) and not isinstance(m, bool) else m for m in self.milestones))
        _check_choice("arch", self.arch, ARCHS)
        if self.arch not in GATED_ARCHS and self.gate_bias not in (None, DEFAULT_GATE_BIAS):
            raise ValueError(f"gate_bias={self.gate_bias!r} means nothing for arch={self.arch!r} (no gate): "
                             f"leave it None, or use arch in {list(GATED_ARCHS)}")
        if self.gate_bias is None:  # frozen: the default is filled in once, here, so the hash sees a number
            object.__setattr__(self, "gate_bias", default_gate_bias(self.arch))
        if isinstance(self.gate_bias, bool) or not isinstance(self.gate_bias, (int, float)) \
                or not math.isfinite(self.gate_bias):
            raise ValueError(f"gate_bias={self.gate_bias!r} is not valid: use a finite number (or None for the "
                             f"arch's default: {DEFAULT_GATE_BIAS:g}, gated {GATE_BIAS['gated']:g})")
        object.__setattr__(self, "gate_bias", float(self.gate_bias))
        _check_choice("shortcut", self.shortcut, SHORTCUTS)
        _check_choice("split", self.split, SPLITS)
        _check_choice("pad_fill", self.pad_fill, PAD_FILLS)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.arch == "plain" and self.shortcut != "A":
            raise ValueError(f"shortcut={self.shortcut!r} means nothing for arch='plain' (no shortcuts): leave it 'A'")
        for name in BOOL_FIELDS:  # --set fast=no would otherwise be a (true) string
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid: use true or false")
        check_depth(self.depth, self.block_layers, self.bottleneck)
        for name in ("width", "iterations", "batch_size", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} is not valid: use a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed={self.seed!r} is not valid: use an integer from 0 to {MAX_SEED - 1}")
        ac = self.activation_checkpointing
        if isinstance(ac, bool) or not isinstance(ac, int) or ac < 0:
            raise ValueError(f"activation_checkpointing={ac!r} is not valid: use an integer >= 0 (segments per "
                             "stage; 0 = off)")
        for name, least, most in (("train_subset", self.batch_size, SPLIT_IMAGES[self.split][0]),
                                  ("eval_subset", 1, SPLIT_IMAGES[self.split][1])):
            # more than the split holds would silently be all of it, in a folder and note naming another size
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not least <= v <= most):
                raise ValueError(f"{name}={v!r} is not valid: use None (all {most:,} images of split "
                                 f"{self.split!r}) or an integer from {least} to {most}")
        def number(name: str, ok: Callable[[float], bool], rule: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name}={v!r} is not valid: use {rule}")

        number("lr", lambda v: v > 0, "a positive number")
        if self.warmup_lr is not None:
            number("warmup_lr", lambda v: v > 0, "a positive number, or None (no warm-up)")
        number("warmup_err", lambda v: 0 < v <= 1, "a fraction in (0, 1] (the warm-up ends below this training error)")
        if self.warmup_lr is None and self.warmup_err != WARMUP_ERR:  # hashed: another folder, the same run
            raise ValueError(f"warmup_err={self.warmup_err!r} means nothing without warmup_lr (no warm-up): "
                             f"leave it {WARMUP_ERR:g}")
        number("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        for name in FLOAT_FIELDS:  # 0 and 0.0 are one run: one hash (JSON, and so the hash, tells them apart)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        ms = self.milestones
        if any(not isinstance(m, int) or isinstance(m, bool) or m <= 0 for m in ms) \
                or any(a >= b for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones={ms!r} are not valid: use strictly increasing positive iteration numbers "
                             "(each divides the lr by 10)")

    # -- identity -----------------------------------------------------------------------
    def result_fields(self) -> dict[str, Any]:
        """The fields that change results, as plain JSON values (what the hash covers)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        if self.arch in MODEL_REVISIONS:
            d["model_revision"] = MODEL_REVISIONS[self.arch]
        if self.bottleneck:
            d["bottleneck_revision"] = BOTTLENECK_REVISION
        return {k: v for k, v in sorted(d.items())
                if k not in NON_RESULT_FIELDS and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}

    @property
    def hash(self) -> str:
        """Stable 12-hex-digit name of this run: same fields, same folder, on any machine."""
        blob = json.dumps(self.result_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Short human label, e.g. 'resnet-56', 'resnet-20 skip1 B' or 'resnet-20 fp32' (a precision asked)."""
        s = f"{self.arch}-{self.depth}"
        if self.bottleneck:
            s += " bottleneck"
        if self.block_layers != 2:
            s += f" skip{self.block_layers}"
        if self.arch != "plain" and self.shortcut != "A":
            s += f" {self.shortcut}"
        if self.precision != "auto":
            s += f" {self.precision}"
        if self.pad_fill != "mean":
            s += f" {self.pad_fill}-pad"
        return s

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunConfig":
        """From config.json, or from a row of `load_runs()` (where pandas turned None into NaN and ints
        of a column with gaps into floats)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        for k, before in ADDED_FIELDS.items():  # a run stored before the field existed had this value
            if k not in d or (isinstance(d[k], float) and math.isnan(d[k])) or d[k] is None:
                d[k] = before
        for k, v in list(d.items()):
            if isinstance(v, float) and math.isnan(v):
                d[k] = None
                if k in BOOL_FIELDS:  # a row of a run stored before the field existed: its default
                    del d[k]
            elif isinstance(v, float) and v.is_integer() and str(fields[k].type).startswith("int"):
                d[k] = int(v)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)


# The switches (bottleneck, fast, compile): checked to be true or false, and NaN in a DataFrame row of a
# run stored before one existed reads as its default.
BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.type in ("bool", bool))


# Presets set the schedule and data budget; the model fields come from the caller.
PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: for tests, proves the plumbing, learns almost nothing
    "smoke": dict(
        iterations=6, batch_size=32, lr=0.05, milestones=(4,), eval_every=3,
        train_subset=256, eval_subset=128, warmup_lr=None,
    ),
    # the whole suite in ~15 minutes on 2 CPU cores: trends visible, not paper numbers. 640 steps (0.4
    # epoch) fill that budget; lr 0.05, since at 0.1 without warm-up 56-layer nets barely leave chance
    # this early (measured: ResNet-56 86% training error after 320 steps of batch 64 at 0.1)
    "quick": dict(
        iterations=640, batch_size=32, lr=0.05, milestones=(480,), eval_every=80,
        train_subset=None, eval_subset=1000,
    ),
    # He et al. 2015, CIFAR-10: all 50k training images, report on the 10k test set
    "paper": dict(
        iterations=64_000, batch_size=128, lr=0.1, milestones=(32_000, 48_000), eval_every=1_000,
        train_subset=None, eval_subset=None, split="full",
    ),
}


def check_preset(preset: str) -> str:
    """The preset, or a ValueError naming it and the presets there are."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not valid: use one of {sorted(PRESETS)}")
    return preset


def make_config(preset: str = "quick", **overrides: Any) -> RunConfig:
    """A `RunConfig` from a preset plus explicit overrides; unknown names fail loudly."""
    check_preset(preset)
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"preset"}  # the preset is the first argument
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown RunConfig field(s) {bad}: allowed are {sorted(known)}")
    kw: dict[str, Any] = dict(PRESETS[preset])
    kw.update(overrides)
    if not isinstance(kw["milestones"], (list, tuple)):  # tuple(5) would raise a TypeError, tuple("5") split it
        raise ValueError(f"milestones={kw['milestones']!r} is not valid: use a list of iteration numbers, "
                         f"e.g. [32000, 48000] (each divides the lr by 10)")
    kw["milestones"] = tuple(kw["milestones"])
    # The paper warms up its deepest nets (110, 1202) at lr 0.01 until training error < 80%.
    depth = kw.get("depth", 20)  # checked by RunConfig; a string here must reach that check, not fail a comparison
    if preset != "smoke" and "warmup_lr" not in overrides and isinstance(depth, int) and depth >= 110:
        kw["warmup_lr"] = 0.01
    return RunConfig(preset=preset, **kw)
