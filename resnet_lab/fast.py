"""The training step, eager or replayed as one captured CUDA graph.

Small CIFAR nets on a big GPU are bound by kernel launches, not FLOPs: a ResNet-56 step is about a
thousand small kernels (forward, backward, optimizer). Capturing forward + backward + fused SGD
into one CUDA graph launches them all at once. The learning rate lives in a device tensor, so
the schedule changes without re-capture. Whatever stops capture (a CPU device, an op that needs
the host, a failed self-check) leaves the eager step in place, with the reason kept in `Stepper.reason`
(the run summary stores it) and logged where a capture was tried and failed. A capture that raises
inside `torch.cuda.graph` also keeps every later step of the process eager (`graph_unavailable` says why).

Optionally (`compile=True`) each residual block runs through `torch.compile` (inductor, without
cudagraphs of its own) inside that captured step: blocks of one shape share one compiled graph (a
ResNet-56's 27 blocks compile 5), so a 1202-layer net compiles as fast as a 20-layer one, where
compiling the whole forward would trace every layer. The graph removes the launch overhead but not the kernels: on an
H200 a ResNet-20 step is about 350 of them, 2-24 us each, BatchNorm's four per layer a quarter of the time
(results/bench/nvidia-h200-profile.txt); inductor fuses BatchNorm, ReLU and the residual add into fewer.
It costs compile time per net, and is used only if its first step agrees with the plain one.

precision="fp16" trades bf16 autocast for fp16 with a dynamic loss scale kept on the device
(`LossScaler`), for one reason: PyTorch hands BatchNorm to cuDNN for fp16 input (its persistent NHWC
kernel, one per pass) but never for bf16, where the native kernels were a quarter of the H200's time.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize

log = logging.getLogger(__name__)
# Set when a capture raised inside `torch.cuda.graph`: an exception there can leave the caching
# allocator believing a capture is still under way (fixed upstream after torch 2.11), so every later
# step in this process stays eager rather than capture into a possibly shared, stale pool.
_capture_failed: str | None = None

# Block shapes one process may compile: dynamo keeps a forward's compiled graphs on its code, which every
# residual block shares (one entry per block shape and kind: depth is free, each net configuration costs
# 2-6, the degradation grid's 8 nets 10 in all, about 16 configurations fill 64), 8 by default, and past
# the limit it would run the block uncompiled without a word.
COMPILE_RECOMPILE_LIMIT = 64
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN/cuBLAS pick and cache their kernels)
CHECK_LOSS_RTOL = 2e-2  # graph vs eager on the first batch: loss, bf16 tolerance
CHECK_UPDATE_RTOL = 0.1  # ... and the parameter update, relative to its size
LOSS_SCALE_INIT, LOSS_SCALE_GROWTH_INTERVAL = 2.0 ** 16, 2000  # fp16's (torch.amp.GradScaler's defaults)
CHECK_SCALE_HALVINGS = 24  # fp16: how often a check whose step overflowed goes again at half the scale


def to_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on `device` in channels_last: the layout bf16 convolutions are fastest in on CUDA. On a
    CPU (2-core EPYC, fp32) it evaluates a ResNet-56 1.2x faster, and trains within the noise of the
    default layout; one layout everywhere keeps CPU and GPU checkpoints alike."""
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float
                   ) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """Fused SGD whose learning rate is a device tensor (so a captured step sees schedule changes)."""
    dev = next(model.parameters()).device
    lr_t = torch.tensor(float(lr), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr_t, momentum=momentum, weight_decay=weight_decay, fused=True)
    return opt, lr_t


@torch.no_grad()
def match_momentum_layout(opt: torch.optim.Optimizer) -> None:
    """Give every momentum buffer its parameter's memory layout.

    A checkpoint keeps the layout it was saved in (channels_last from CUDA) and `load_state_dict`
    changes only device and dtype; the fused SGD kernel walks buffer and parameter element by
    element, so a buffer in another layout would be silently scrambled on the next step.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf.stride() != p.stride():
                opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)


def compute_dtype(device: torch.device, precision: str) -> str:
    """What a run's `precision` means on this device: "bf16" or "fp16" (autocast) when asked for, on any
    device; "bf16" on CUDA for "auto"; else "fp32"."""
    if precision in ("bf16", "fp16"):
        return precision
    return "bf16" if precision == "auto" and device.type == "cuda" else "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls computed in fp32. PyTorch lets cuDNN run fp32 convolutions in TF32 (a
    10-bit mantissa) by default on Ampere and later GPUs, so without this the "fp32" evaluation and 08's fp32
    reference loop would not be fp32 there. The legacy flags, unless the process has set torch's newer
    `fp32_precision` API (reading the legacy ones then raises): then that API's, so that the two never mix."""
    try:
        legacy = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        legacy = None
    if legacy is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ("auto") or when asked ("bf16"), fp16 when asked; nothing for fp32 (callers that
    compute in fp32 hold `exact_fp32` around the whole computation, backward included).

    cache=False inside graph capture: the autocast weight cache would hold casts of the capture-time
    weights, stale at every replay.
    """
    dtype = AUTOCAST_DTYPES.get(compute_dtype(device, precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class LossScaler:
    """Dynamic loss scaling for fp16, all on the device, so a captured graph replays it whole.

    The loss is multiplied by `scale` before backward (fp16 gradients too small for fp16 would be zeros);
    the gradients are unscaled and checked for inf/NaN; the fused SGD kernel skips the update when they
    are not finite (`found_inf`), and `scale` halves; after `growth_interval` clean steps it doubles.
    `torch.amp.GradScaler` does the same, but reads its Python-side state each step, which a replayed
    graph would not. `skipped` counts the steps skipped, for the run's summary.
    """

    GROWTH, BACKOFF = 2.0, 0.5
    STATE = ("scale", "growth_tracker", "skipped")  # what a checkpoint keeps

    def __init__(self, device: torch.device, init_scale: float = LOSS_SCALE_INIT,
                 growth_interval: int = LOSS_SCALE_GROWTH_INTERVAL):
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)  # clean steps since a change
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._inv = torch.ones((), dtype=torch.float32, device=device)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Unscale the gradients and step `opt` (fused SGD) unless one is inf/NaN; then update the scale."""
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.found_inf.zero_()
        torch.reciprocal(self.scale, out=self._inv)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self._inv)
        opt.found_inf = self.found_inf  # read by the fused kernel, on the device: skip when 1
        try:
            opt.step()
        finally:  # a later step of this optimizer without the scaler must not read a stale flag
            del opt.found_inf
        self.skipped.add_(self.found_inf)
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.GROWTH, self.BACKOFF,
                                 self.growth_interval)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().clone() for k in self.STATE}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.STATE:
            getattr(self, k).copy_(state[k])


@torch.no_grad()
def zero_momentum(opt: torch.optim.Optimizer) -> None:
    """Give every parameter a zero momentum buffer where it has none.

    The fused SGD kernel allocates a fresh run's buffers uninitialised and fills them on the first step,
    unless that step is skipped (fp16's found_inf): then the next step would read garbage. With zeros,
    the first step's buf = momentum * 0 + grad = grad, what SGD's first step sets anyway.
    """
    for group in opt.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if opt.state.get(p, {}).get("momentum_buffer") is None:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)


def step_body(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              precision: str = "auto", cache: bool = True, members: int = 1, scaler: LossScaler | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, optimizer step on uint8 images; (loss, wrong count) stay on the device.

    members > 1: `model` is a `GroupedNets` and x holds each member's batch in turn; loss and wrong
    count come back per member, shape (members,). scaler: fp16's loss scale (one net only: `Stepper`
    refuses it for a GroupedNets).
    """
    xf = normalize(x).contiguous(memory_format=torch.channels_last)  # the models' layout (to_device)
    # fp32: forward and backward (autocast covers the forward only)
    with exact_fp32() if compute_dtype(xf.device, precision) == "fp32" else contextlib.nullcontext():
        return _forward_backward_step(model, opt, xf, y, precision, cache, members, scaler)


def _forward_backward_step(model: nn.Module, opt: torch.optim.Optimizer, xf: torch.Tensor, y: torch.Tensor,
                           precision: str, cache: bool, members: int, scaler: LossScaler | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(xf.device, precision, cache):
        out = model(xf)
    wrong = out.detach().argmax(1) != y
    if members == 1:
        loss = F.cross_entropy(out.float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.backward(loss)
            scaler.step(opt)
        return loss.detach(), wrong.sum()
    per_member = F.cross_entropy(out.float(), y, reduction="none").view(members, -1).mean(1)
    per_member.mean().backward()  # GroupedNets scales the gradient back up by `members`
    opt.step()
    return per_member.detach(), wrong.view(members, -1).sum(1)


class Stepper:
    """`stepper(x, y, lr) -> (loss, wrong)`: one training step, as a CUDA graph where it can be.

    The returned tensors are valid until the next call (in graph mode they are the graph's outputs).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, lr_t: torch.Tensor,
                 precision: str = "auto", fast: bool = True, members: int = 1, compile: bool = False):
        self.model, self.opt, self.lr_t, self.precision, self.members = model, opt, lr_t, precision, members
        self.mode = "eager"
        self.reason: str | None = None if fast else "fast=False"
        self._want_graph, self._tried = fast, False
        self._forward: nn.Module = model  # what the step calls: the model, or its compiled twin
        self._want_compile, self.compiled = compile, False
        self.compile_reason: str | None = None  # why a compile asked for is not used
        self.compile_check: dict | None = None  # compiled vs plain step on the first batch
        self._graph: torch.cuda.CUDAGraph | None = None
        self._side: torch.cuda.Stream | None = None  # the capture stream, kept for the graph's lifetime
        self._lr: float | None = None
        self.check: dict | None = None  # graph-vs-eager numbers on the first batch
        self.scaler: LossScaler | None = None  # fp16's loss scale (its state goes into checkpoints)
        if compute_dtype(lr_t.device, precision) == "fp16":
            if members > 1:
                raise ValueError("precision 'fp16' cannot train grouped runs: one loss scale would skip every "
                                 "member's step when one member's gradients overflow")
            self.scaler = LossScaler(lr_t.device, LOSS_SCALE_INIT, LOSS_SCALE_GROWTH_INTERVAL)
            zero_momentum(opt)

    def set_lr(self, lr: float) -> None:
        if lr != self._lr:
            self.lr_t.fill_(lr)
            for g in self.opt.param_groups:  # a loaded optimizer state brings its own lr tensor
                g["lr"] = self.lr_t
            self._lr = lr

    @property
    def label(self) -> str:
        """The step as a run's summary names it: "graph" or "eager", "+compile" when compiled."""
        return self.mode + ("+compile" if self.compiled else "")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.set_lr(lr)
        if self._want_compile:
            self._want_compile = False
            self._try_compile(x, y)
        if self._want_graph and not self._tried:
            self._tried = True
            self._try_capture(x, y)
        if self._graph is not None and x.shape == self._x.shape:
            self._x.copy_(x)
            self._y.copy_(y)
            self._graph.replay()
            return self._loss, self._wrong
        self.opt.zero_grad(set_to_none=True)
        return self._body(x, y)

    def _body(self, x: torch.Tensor, y: torch.Tensor, cache: bool = True, forward: nn.Module | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self._forward if forward is None else forward
        # through the compiled twin always without the autocast weight cache (nothing to cache inside an
        # inductor graph): dynamo guards on the flag, and a second value would compile the net again
        # during the capture's warm-up, a version the check against the plain step never saw
        cache = cache and forward is self.model
        return step_body(forward, self.opt, x, y, self.precision, cache, self.members, self.scaler)

    # -- compile ------------------------------------------------------------------------------
    def _try_compile(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compile the forward (the first call does), and keep it only if one step through it agrees
        with the plain step from the same state; anything else leaves the plain forward, reason kept."""
        snap = self._snapshot()
        try:
            _allow_many_nets()
            twin = compiled_twin(self.model)
            self.compile_check = self._agree(lambda: self._body(x, y, forward=self.model)[0],
                                             lambda: self._body(x, y, forward=twin)[0], snap, "compiled")
            _require_agreement(self.compile_check, "compiled")
            self._forward, self.compiled = twin, True
        except Exception as e:  # the plain step is always there
            self._restore(snap)
            self.compile_reason = f"torch.compile not used ({error_line(e, 500)})"  # not dynamo's whole traceback
            log.warning("%s; training with the plain forward", self.compile_reason)
        self.opt.zero_grad(set_to_none=True)

    # -- capture ------------------------------------------------------------------------------
    def _try_capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        reason = graph_unavailable(x.device)
        if reason:
            self.reason = reason
            return
        snap = self._snapshot()
        stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
        try:
            self._capture(x, y)
            self._restore(snap)
            self._self_check(x, y, snap)
            for p, g in zip(self._params(), self._grads):  # .grad shows what the replays compute
                p.grad = g
            self.mode, self.reason = "graph", None
            with contextlib.suppress(RuntimeError):  # what the self-check's eager step cached: the graph has its pool
                torch.cuda.empty_cache()
        except Exception as e:  # anything at all: the eager step is always correct
            if stream is not None:  # torch's graph context stays on its capture stream when ending it fails
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize(x.device)
            # drop the graph and everything allocated from its pool, so the pool can be freed
            self._graph = self._grads = self._loss = self._wrong = self._x = self._y = self._side = None
            self.reason = f"CUDA graph not used ({type(e).__name__}: {e})"
            self._restore(snap)
            self.opt.zero_grad(set_to_none=True)
            with contextlib.suppress(RuntimeError):  # an allocator upset by the failed capture may assert here
                torch.cuda.empty_cache()
            if self.compiled and not _capture_failed:  # failed before capturing (a recompile in the warm-up, a
                # disagreeing replay): the graph is worth more than the compile, so try it with the plain forward
                self._forward, self.compiled = self.model, False
                self.compile_reason = f"torch.compile dropped: {self.reason}"
                log.warning("%s; capturing the plain forward", self.compile_reason)
                self.reason = None
                return self._try_capture(x, y)
            log.warning("%s; training with the eager step", self.reason)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        global _capture_failed
        self._x, self._y = x.clone(), y.clone()
        cur = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side), self._no_recompile():  # a recompile fails here, before the capture
            for _ in range(WARMUP_STEPS):
                self.opt.zero_grad(set_to_none=True)
                self._body(self._x, self._y, cache=False)
        cur.wait_stream(side)
        torch.cuda.empty_cache()  # the graph gets its own memory pool: hand back what the warm-up cached
        g = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad from the graph's pool
        # Captured on this stepper's own stream, not torch's one shared capture stream: cuBLAS caches its
        # workspace per stream, and graphs of packed runs replaying at once must not share one.
        self._side = side
        try:
            with torch.cuda.graph(g, stream=side), self._no_recompile():
                self._loss, self._wrong = self._body(self._x, self._y, cache=False)
        except Exception as e:
            _capture_failed = f"{type(e).__name__}: {e}"
            _end_broken_capture(g, side)
            raise
        self._graph, self._grads = g, [p.grad for p in self._params()]

    def _no_recompile(self):
        """While capturing a compiled forward: a recompile there (a guard that the warm-up did not see)
        would compile inside the capture, which fails obscurely; make it fail saying so."""
        stance = getattr(torch.compiler, "set_stance", None)
        return stance("fail_on_recompile") if self.compiled and stance else contextlib.nullcontext()

    def _snapshot(self) -> dict:
        """Weights, BN statistics, momentum buffers and loss scale: capture's warm-up steps must leave no trace."""
        with torch.no_grad():
            model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            bufs = [self.opt.state.get(p, {}).get("momentum_buffer") for p in self._params()]
            scaler = None if self.scaler is None else self.scaler.state_dict()
            return {"model": model, "bufs": [None if b is None else b.detach().clone() for b in bufs], "scaler": scaler}

    def _restore(self, snap: dict) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(snap["model"][k])
            for p, b in zip(self._params(), snap["bufs"]):
                buf = self.opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    # a fresh run has no buffer yet; SGD's first step sets buf = grad, which is
                    # what momentum * 0 + grad gives
                    buf.copy_(b) if b is not None else buf.zero_()
            if snap["scaler"] is not None:
                self.scaler.load_state_dict(snap["scaler"])

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().float().flatten() for p in self._params()])

    def _self_check(self, x: torch.Tensor, y: torch.Tensor, snap: dict) -> None:
        """One eager step and one replay from the same state must agree, or the graph is not used."""
        def replay() -> torch.Tensor:
            self._x.copy_(x)
            self._y.copy_(y)
            self._graph.replay()
            return self._loss

        self.check = self._agree(lambda: self._body(x, y)[0], replay, snap, "graph")
        _require_agreement(self.check, "graph")

    def _agree(self, reference, other, snap: dict, what: str) -> dict:
        """Take one step each way from the state `snap` (each returns its loss), put the state back, and
        return their losses and the relative differences of loss and parameter update.

        fp16: a step its loss scale skips (gradients overflowed) updates nothing, so two skipped steps would
        agree without having compared anything, and one skipped beside one taken (a scale at the edge)
        would disagree for a reason that is not the graph's; either way both steps go again at half the
        scale (the check's own copy: the run's scale is put back), and the check says the scale it used."""
        def step(fn, start: dict) -> tuple[float, torch.Tensor, torch.Tensor, bool]:
            p0, b0 = self._flat(), self._flat_stats()
            self.opt.zero_grad(set_to_none=True)
            loss = float(fn().mean())
            upd, stats = self._flat() - p0, self._flat_stats() - b0
            skipped = self.scaler is not None and bool(self.scaler.found_inf)
            self._restore(start)
            return loss, upd, stats, skipped

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / b.norm().clamp_min(1e-12)) if b.numel() else 0.0

        start = snap
        for _ in range(CHECK_SCALE_HALVINGS):
            (loss_e, upd_e, st_e, skip_e), (loss_o, upd_o, st_o, skip_o) = step(reference, start), step(other, start)
            if not (skip_e or skip_o):
                break
            start = {**start, "scaler": {**start["scaler"], "scale": start["scaler"]["scale"] / 2}}
            self._restore(start)  # both steps of the next round from the halved scale (each restores after)
        if start is not snap:
            self._restore(snap)
        out = {"loss_eager": loss_e, f"loss_{what}": loss_o, "loss_rel_diff": abs(loss_o - loss_e) / max(1.0, abs(loss_e)),
               "update_rel_diff": rel(upd_o, upd_e), "bn_stats_rel_diff": rel(st_o, st_e)}
        if self.scaler is not None:
            out.update(loss_scale=float(start["scaler"]["scale"]), skipped=bool(skip_e or skip_o))
        return out

    def _flat_stats(self) -> torch.Tensor:
        """BatchNorm's running statistics (the float buffers), which the step updates besides the weights."""
        return torch.cat([b.detach().float().flatten() for b in self.model.buffers() if b.is_floating_point()]
                         or [torch.zeros(0)])


def compiled_twin(model: nn.Module) -> nn.Module:
    """`model` with each residual block through `torch.compile`, sharing every parameter and buffer with it.

    Shallow copies down to each `CifarResNet` (a `GroupedNets` holds one), whose `blocks` become compiled
    wrappers of the very same blocks; `model` itself is untouched (the plain forward the compiled one is
    checked against). A model without blocks is compiled whole."""
    from .models import CifarResNet

    if not any(isinstance(m, CifarResNet) for m in model.modules()):
        return torch.compile(model, dynamic=False)

    def twin(m: nn.Module) -> nn.Module:
        if not any(isinstance(x, CifarResNet) for x in m.modules()):
            return m
        t = copy.copy(m)  # shares _parameters and _buffers with m; children replaced below
        t._modules = {k: twin(v) for k, v in m._modules.items()}
        if isinstance(m, CifarResNet):
            t._modules["blocks"] = nn.ModuleList([torch.compile(b, dynamic=False) for b in m.blocks])
        return t

    return twin(model)


def dynamo_limit_names(cfg) -> tuple[str, str]:
    """The names of dynamo's recompile limit and of its fail-when-hit switch in `cfg` (torch._dynamo.config):
    torch before 2.7 calls them cache_size_limit and fail_on_cache_limit_hit."""
    if hasattr(cfg, "recompile_limit"):
        return "recompile_limit", "fail_on_recompile_limit_hit"
    return "cache_size_limit", "fail_on_cache_limit_hit"


def _allow_many_nets() -> None:
    """Raise dynamo's limit of compiled versions per forward to COMPILE_RECOMPILE_LIMIT, and make passing
    it an error (which `_try_compile` reports) rather than a forward silently left uncompiled."""
    cfg = torch._dynamo.config
    limit, fail = dynamo_limit_names(cfg)
    setattr(cfg, limit, max(getattr(cfg, limit), COMPILE_RECOMPILE_LIMIT))
    setattr(cfg, fail, True)


def _require_agreement(check: dict, what: str) -> None:
    """Raise unless `Stepper._agree`'s differences are within the tolerances (bf16 allows for other kernels).
    The running statistics count for a compiled forward only (inductor rewrites BatchNorm; a graph replays
    the very kernels of the eager step, whose check is unchanged since the GPU measured it)."""
    if check.get("skipped"):  # fp16: every scale tried overflowed, so no update was compared
        raise RuntimeError(f"{what} step not checked: its fp16 gradients overflowed at every loss scale tried: {check}")
    stats_ok = what != "compiled" or check["bn_stats_rel_diff"] <= CHECK_UPDATE_RTOL
    if not (check["loss_rel_diff"] <= CHECK_LOSS_RTOL and check["update_rel_diff"] <= CHECK_UPDATE_RTOL and stats_ok):
        raise RuntimeError(f"{what} step disagrees with the eager step: {check}")


def _end_broken_capture(g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> None:
    """End a capture that broke inside its body, if `stream` is still capturing.

    Left capturing, every later allocation or random draw on that stream fails too ("Offset increment
    outside graph capture"), and the eager fallback with it.
    """
    with contextlib.suppress(Exception), torch.cuda.stream(stream):
        if torch.cuda.is_current_stream_capturing():
            g.capture_end()


def error_line(e: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message', at most `limit` characters: what a summary or a table says of
    an error whose whole text (dynamo's, CUDA's) runs to pages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def graph_unavailable(device: torch.device) -> str | None:
    """Why a CUDA graph cannot be used on `device`, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, got {device.type!r}"
    if _capture_failed:
        return f"an earlier CUDA graph capture in this process failed ({_capture_failed}); eager from then on"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None
