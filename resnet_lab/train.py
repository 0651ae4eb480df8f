"""The training loop: the paper's SGD recipe, periodic evaluation, atomic checkpoints, exact resume."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig, check_device, is_int, is_number
from .data import Cifar10, DeviceLoader, eval_batches, load_cifar10, normalize, split_data
from .fast import (LossScaler, Stepper, autocast, compute_dtype, exact_fp32, make_optimizer, match_momentum_layout,
                   step_body, to_device)
from .models import count_params, model_from_config
from .runs import (CHECKPOINT_FILES, FINISHED, JOINED, METRIC_COLUMNS, RunDir, RunLocked, atomic_save_torch,
                   atomic_write_csv, atomic_write_json, can_resume, lock_run)
from .transfer import recover_stranded, stranded

log = logging.getLogger(__name__)
WARMUP_CHECK_EVERY = 20  # steps between host reads of the training error during warm-up
# Test error is measured in fp32 whatever the training precision: evaluating in bf16 moved the predictions
# of 0.3-1.2% of test images on our quick nets (0.15-0.65 points of error, measured on the CPU), more than
# the paper's seed spread (ResNet-110: 6.61 ± 0.16%); and the analyses, which evaluate in fp32, then agree.
EVAL_PRECISION = "fp32"


class ResultsWriteError(RuntimeError):
    """Results could not be written (disk full, permissions); nothing already stored was damaged."""


@dataclass
class RunRecord:
    """A run as stored: its config, folder, summary and curves."""

    config: RunConfig
    path: Path
    summary: dict
    metrics: pd.DataFrame

    @property
    def status(self) -> str:
        return self.summary.get("status", "running")

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained model (weights_only load)."""
        return RunDir(self.config, self.path.parent).load_model(device)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device every entry point takes: None or "auto" is CUDA where there is one, else the CPU; a name must be
    cpu, cuda or cuda:N (config.check_device, as --device): torch's own error lists twenty device kinds, and came after
    the data had loaded."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(device))


def check_pack(pack: Any) -> int:
    """`pack` (runs stepped together), or a ValueError naming it."""
    if not is_int(pack) or pack < 1:
        raise ValueError(f"pack={pack!r} is not valid: use an integer >= 1")
    return pack


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, error rate) of `model` in eval mode over uint8 (images, labels) batches."""
    was_training = model.training
    model.eval()
    loss_sum, wrong, n = None, None, 0
    with exact_fp32():  # fp32 means fp32 (no TF32); bf16/fp16 autocast below is unaffected by it
        for x, y in batches:
            with autocast(x.device, precision):
                out = model(normalize(x))
            l = F.cross_entropy(out.float(), y, reduction="sum")
            w = (out.argmax(1) != y).sum()
            loss_sum = l if loss_sum is None else loss_sum + l
            wrong = w if wrong is None else wrong + w
            n += len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    return float(loss_sum) / n, float(wrong) / n


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               precision: str = "auto", scaler: LossScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager SGD step on uint8 images; returns (loss, wrong count) as device tensors (no host sync).

    The reference the fast path (`fast.Stepper`) is checked against; scaler: fp16's loss scale."""
    opt.zero_grad(set_to_none=True)
    return step_body(model, opt, x, y, precision, scaler=scaler)


def lr_at(cfg: RunConfig, step: int, warming_up: bool) -> float:
    """Step schedule: lr / 10 at each milestone; warm-up lr while the warm-up lasts."""
    if warming_up:
        return float(cfg.warmup_lr)
    return cfg.lr * 0.1 ** sum(step >= m for m in cfg.milestones)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The processor's model name (Linux), or None: short CPU runs differ in the last digits between
    processors (other float kernels), so a run records which one it had."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or None


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or 'cpu (AMD EPYC, x86_64, 2 threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    return f"cpu ({model + ', ' if model else ''}{platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    """A device name as a file name: 'nvidia-h200', 'cpu-amd-epyc-x86-64-2-threads'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def resolve_dataset(cfg: RunConfig, data: Cifar10) -> RunConfig:
    """Fill in which CIFAR-10 copy the run uses; a config pinned to another copy is refused."""
    sha = data.info.sha256[:16]
    if cfg.dataset and cfg.dataset != sha:
        raise ValueError(f"config asks for dataset {cfg.dataset!r} but the source {data.info.path!r} is {sha!r}")
    return dataclasses.replace(cfg, dataset=sha)


def _record(rd: RunDir) -> RunRecord:
    return RunRecord(rd.cfg, rd.path, rd.summary() or {}, rd.metrics())


LOCKED = "locked"  # a RunRecord's status (never stored) for a run another process is training: left to it


def _locked(rd: RunDir) -> RunRecord:
    log.warning("run %s is held by another process (a trainer or an import): left to it (with a time budget no "
                "run waits for a lock)", rd.cfg.name)
    return RunRecord(rd.cfg, rd.path, {"status": LOCKED, "name": rd.cfg.name, "hash": rd.cfg.hash}, rd.metrics())


_CHECKPOINT_KEYS = ("model", "optimizer", "step", "seconds", "warming_up", "warmup_end", "torch_rng",
                    "accumulators")  # and "sittings", absent from checkpoints written before it was kept
# What a run's summary says of each sitting (a process that trained it from one step to another), with its
# steps, step mode and seconds.
SITTING_FIELDS = ("device", "compute_dtype", "torch", "packed_runs", "grouped_runs")


def _resume(rd: RunDir, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Load the newest checkpoint that fits into `model` and `opt`, and return it.

    One that cannot be read, or that does not fit (written by another version of the net), is set
    aside with a warning, never trusted, and the model and optimizer are left as they were built;
    otherwise such a file would fail every later call of the run.
    """
    for tmp in rd.path.glob(".*.tmp"):  # half-written by a trainer killed mid-save (the caller holds the run's
        tmp.unlink(missing_ok=True)  # lock, so no one writes them now): a checkpoint is 155 MB for ResNet-1202
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    for f in (rd.path / n for n in CHECKPOINT_FILES):
        if not f.exists():
            continue
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
            missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
            if missing:
                raise KeyError(f"no {', '.join(missing)} in it")
            _check_state(ckpt)
            _check_loss_scale(ckpt.get("loss_scale"))
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])  # checks everything before it changes anything
            match_momentum_layout(opt)  # a CUDA checkpoint (channels_last) resumed on the CPU, or back
            return ckpt
        except Exception as e:
            model.load_state_dict(fresh)
            opt.state.clear()
            bad = f.with_name(f"{f.name}.bad-{int(time.time())}")
            os.replace(f, bad)
            log.warning("checkpoint %s failed to load (%s: %s); set aside as %s", f, type(e).__name__, e, bad.name)
    return None


def _check_state(ckpt: dict) -> None:
    """The training state beside the weights, as `_checkpoint` writes it: checked before anything is used, so a
    malformed file is set aside like an unreadable one instead of failing the resume, call after call."""
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    acc, rng = ckpt["accumulators"], ckpt["torch_rng"]
    problems = [name for name, ok in (
        ("step", count(ckpt["step"])),
        ("seconds", isinstance(ckpt["seconds"], (int, float)) and not isinstance(ckpt["seconds"], bool)),
        ("warming_up", isinstance(ckpt["warming_up"], bool)),
        ("warmup_end", ckpt["warmup_end"] is None or count(ckpt["warmup_end"])),
        ("torch_rng", isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
         and rng.shape == torch.get_rng_state().shape),
        ("accumulators", isinstance(acc, dict) and all(isinstance(acc.get(k), torch.Tensor) and acc[k].numel() == 1
                                                       for k in ("loss", "wrong", "win_wrong"))
         and all(count(acc.get(k)) for k in ("seen", "win_seen"))),
        ("sittings", ckpt.get("sittings") is None or isinstance(ckpt["sittings"], list)),
    ) if not ok]
    if problems:
        raise ValueError(f"its {', '.join(problems)} {'is' if len(problems) == 1 else 'are'} not what a checkpoint "
                         "of this version holds")


def _check_loss_scale(state: object) -> None:
    """A checkpoint's fp16 loss scale (absent for other precisions) must be what `LossScaler` loads: checked
    with the rest of the checkpoint, so a bad one sets the file aside instead of failing every later call."""
    if state is None:
        return
    keys = LossScaler.STATE
    if not (isinstance(state, dict) and all(isinstance(state.get(k), torch.Tensor) and state[k].dim() == 0
                                            for k in keys)):
        raise ValueError(f"its loss_scale is not {{{', '.join(keys)}}} as scalar tensors")


def _earlier_sittings(summary: dict, start: int, seconds: float) -> list[dict[str, Any]]:
    """The sittings up to `start` of a checkpoint that does not list them: those the last summary lists, if they
    end there, else one sitting as that summary describes it (or more, which it cannot tell)."""
    listed = summary.get("sittings")
    if isinstance(listed, list) and listed and all(isinstance(x, dict) for x in listed) \
            and listed[-1].get("to_step") == start:
        return [dict(x) for x in listed]
    fields = {k: summary.get(k) for k in SITTING_FIELDS}
    for k in ("device", "compute_dtype"):  # a joined name is not one sitting's
        if isinstance(fields[k], str) and JOINED in fields[k]:
            fields[k] = None
    return [{"from_step": 0, "to_step": start, **fields, "step_mode": summary.get("step_mode"),
             "seconds": round(seconds, 3)}]


def _save_checkpoint(rd: RunDir, state: dict) -> None:
    if rd.checkpoint_file.exists():  # keep the previous good one until the new one is safely on disk
        os.replace(rd.checkpoint_file, rd.path / "checkpoint.prev.pt")
    atomic_save_torch(state, rd.checkpoint_file)


def _drop_checkpoints(rd: RunDir) -> None:
    for f in (rd.path / n for n in CHECKPOINT_FILES):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # a read-only store: the finished run is still the result
            log.warning("cannot remove %s (%s)", f, e)


def _finished(rd: RunDir) -> RunRecord:
    """A finished run's record. A run killed between writing its final summary and deleting its checkpoints
    kept them for good (a ResNet-1202's are 310 MB): they go now."""
    _drop_checkpoints(rd)
    return _record(rd)


def train(cfg: RunConfig, root: str | os.PathLike | None = None, device: str | torch.device | None = None,
          data: Cifar10 | None = None, progress: bool | None = None, stop_after: int | None = None,
          checkpoint_every_s: float = 120.0, time_budget_s: float | None = None) -> RunRecord:
    """Train `cfg` once: a finished config is returned from the store, an interrupted one resumes.

    stop_after: leave after this many total steps with a checkpoint (as a kill would), for tests.
    time_budget_s: leave with a checkpoint once this many seconds have passed, for runs longer than
    one sitting (the GPU machine's 10-minute calls); the next call resumes exactly.
    """
    deadline = deadline_after(time_budget_s)
    device = resolve_device(device)
    data = data if data is not None else load_cifar10()
    cfg = resolve_dataset(cfg, data)
    rd = RunDir(cfg, root)
    if rd.status() in FINISHED and not stranded(rd.path):  # unlocked: a folder an import left half-done is not
        return _finished(rd)  # finished whatever its summary says
    try:
        with lock_run(rd.path, wait=deadline is None):  # with a time budget, no wait for another process
            recover_stranded(rd.path)
            if rd.status() in FINISHED:  # another process finished it while we waited (or an import brought it)
                return _finished(rd)
            return _train_locked(cfg, rd, device, data, progress, stop_after, checkpoint_every_s, deadline)
    except RunLocked:
        return _locked(rd)
    except OSError as e:  # disk full, permissions: say where; finished runs are untouched (atomic writes)
        raise ResultsWriteError(f"cannot write run {cfg.hash} ({cfg.name}) under {rd.path}: "
                                f"{e.strerror or e}") from e


@contextlib.contextmanager
def _ctrl_c_after_step() -> Iterator[Callable[[], bool]]:
    """Yields `interrupted()`: whether Ctrl-C came. The first Ctrl-C waits for the step under way to end, so the
    trainer stops there as at a time budget, with a checkpoint that resumes exactly (a KeyboardInterrupt inside
    a step would leave the weights a step ahead of the step count), then raises KeyboardInterrupt; a second one
    interrupts at once, leaving the run as a kill would (its last checkpoint, status running). Only where
    Python's own handler is in place, in the main thread (a notebook kernel's interrupt included)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    pressed: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        log.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _train_locked(cfg: RunConfig, rd: RunDir, device: torch.device, data: Cifar10, progress: bool | None,
                  stop_after: int | None, checkpoint_every_s: float, deadline: float | None = None) -> RunRecord:
    if device.type == "cpu":
        _set_cpu_threads()
    with _ctrl_c_after_step() as interrupted:
        try:
            run = _Run(cfg, rd, device, data, progress, stop_after, checkpoint_every_s)
        except KeyboardInterrupt:  # not a failure: the run resumes from where it was
            raise
        except BaseException as e:  # say so in the run's summary, as a packed run that cannot start does
            _store_failure(rd, cfg, e)
            raise
        try:
            while run.step():
                if interrupted() or deadline is not None and time.monotonic() >= deadline:
                    break
            rec = run.finish()
        except KeyboardInterrupt:  # a second Ctrl-C: left as a kill leaves it, resumable, not failed
            run.bar.close()
            raise
        except BaseException as e:
            run.fail(e)
            raise
    if interrupted() and rec.status == "running":  # stopped with a checkpoint: the caller stops too
        raise _stopped([rec])
    return rec


def _stopped(recs: list[RunRecord]) -> KeyboardInterrupt:
    """The KeyboardInterrupt a first Ctrl-C ends in, saying what it stopped and how to go on: in a notebook it
    is the last line of the cell's output (a bare one read as a crash, with nothing about resuming)."""
    runs = ", ".join(f"{r.config.name} seed {r.config.seed} at step {r.summary.get('steps_done', 0):,}" for r in recs)
    return KeyboardInterrupt(f"stopped {runs or 'before the next runs began'}, with a checkpoint: the same call "
                             f"(in a notebook, the cell run again) resumes from there")


# Training images (iterations x batch) from which a run on the CPU is announced as long: 20 epochs of CIFAR-10,
# about half an hour of ResNet-20 on 2 cores (870 images/s) and hours for deeper nets; the paper's 64k x 128 is 164
CPU_LONG_IMAGES = 1_000_000

# Seconds between progress-bar refreshes when stderr is not a terminal (a notebook, a log file). An
# executed notebook keeps every refresh as an output: 01's quick copy was 900 KB at tqdm's 0.1 s.
PROGRESS_EVERY_S = 5.0


def progress_interval(stream: TextIO | None = None) -> float:
    """tqdm's mininterval: its default on a terminal, PROGRESS_EVERY_S elsewhere."""
    stream = sys.stderr if stream is None else stream
    return 0.1 if getattr(stream, "isatty", lambda: False)() else PROGRESS_EVERY_S


def _set_cpu_threads() -> None:
    # all the cores this process may use, or what a sweep gave it ($RESNET_LAB_THREADS)
    torch.set_num_threads(int(os.environ.get("RESNET_LAB_THREADS") or max(1, len(os.sched_getaffinity(0)))))


class _Run:
    """One run while it trains: `train` drives one, `train_many` several in lockstep on one GPU.

    Everything the run launches goes to its own CUDA stream when it has one, so the kernels of
    packed runs overlap on the GPU.
    """

    def __init__(self, cfg: RunConfig, rd: RunDir, device: torch.device, data: Cifar10, progress: bool | None,
                 stop_after: int | None, checkpoint_every_s: float, stream: torch.cuda.Stream | None = None,
                 packed: int = 1):
        self.cfg, self.rd, self.device, self.stream = cfg, rd, device, stream
        self.checkpoint_every_s = checkpoint_every_s
        self.end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
        self.group: _Group | None = None
        with self.on_stream():
            self._setup(data, progress, packed)

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _setup(self, data: Cifar10, progress: bool | None, packed: int) -> None:
        cfg, rd, device = self.cfg, self.rd, self.device
        atomic_write_json(rd.config_file, {**cfg.to_json(), "hash": cfg.hash})
        tx, ty, ex, ey = split_data(data, cfg.split, cfg.train_subset, cfg.eval_subset)
        self.ex, self.ey = ex.to(device), ey.to(device)
        self.loader = DeviceLoader(tx, ty, cfg.batch_size, cfg.seed, device, cfg.pad_fill)

        torch.manual_seed(cfg.seed)
        model = model_from_config(cfg)
        from .analysis import count_macs  # FLOPs of the fresh model, before it moves to the device

        macs = count_macs(model)  # multiply-adds: what He et al. call FLOPs (the summary's flops are 2 per MAC)
        model = to_device(model, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        self.model = model
        opt, lr_t = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.opt = opt
        self.start, self.rows, self.seconds, self.sittings = 0, [], 0.0, []
        self.warming_up = cfg.warmup_lr is not None
        self.warmup_end = None
        earlier = rd.summary() or {}  # the last sitting's summary, before this one rewrites it
        ckpt = _resume(rd, model, opt)
        acc = None
        if ckpt is None and rd.metrics_file.exists():  # starts at step 0: rows of an earlier start are stale
            said = (rd.summary() or {}).get("steps_done")  # the earlier start's summary, not yet rewritten
            if isinstance(said, int) and said > 0:
                log.warning("%s: its summary says step %s but there is no checkpoint here to resume from (its "
                            "progress travelled without one): it starts again at step 0", cfg.name, said)
            atomic_write_csv(pd.DataFrame(columns=METRIC_COLUMNS), rd.metrics_file)
        if ckpt is not None:
            self.start, self.seconds = int(ckpt["step"]), float(ckpt["seconds"])
            self.warming_up, self.warmup_end = bool(ckpt["warming_up"]), ckpt["warmup_end"]
            stored = rd.metrics().to_dict("records")
            self.rows = [r for r in stored if r["step"] <= self.start]  # drop rows past it
            if len(self.rows) < len(stored):  # evaluations of a sitting killed after them: not this run's curve
                atomic_write_csv(pd.DataFrame(self.rows, columns=METRIC_COLUMNS), rd.metrics_file)
            have = {int(r["step"]) for r in self.rows}
            gap = [s for s in range(cfg.eval_every, self.start + 1, cfg.eval_every) if s not in have]
            if gap:  # a curve older than its checkpoint (copied apart from it): say so, the figure will show it
                log.warning("%s: metrics.csv lacks the evaluations at step%s %s before its checkpoint (step %d): "
                            "its curve will have a gap there", cfg.name, "s" if len(gap) > 1 else "",
                            ", ".join(f"{s:,}" for s in gap[:5]) + (", ..." if len(gap) > 5 else ""), self.start)
            self.sittings = [dict(x) for x in ckpt.get("sittings") or []]
            if not self.sittings and self.start > 0:  # a checkpoint from before sittings were recorded
                self.sittings = _earlier_sittings(earlier, self.start, self.seconds)
            torch.set_rng_state(ckpt["torch_rng"])
            acc = ckpt["accumulators"]
            log.info("resuming %s at step %d", cfg.name, self.start)
        self.stepper = Stepper(model, opt, lr_t, cfg.precision, fast=cfg.fast, compile=cfg.compile)
        if self.stepper.scaler is not None and ckpt is not None and "loss_scale" in ckpt:
            self.stepper.scaler.load_state_dict(ckpt["loss_scale"])  # else it starts afresh and backs off
        # this sitting's SITTING_FIELDS (the summary's top-level device and dtype name every sitting's)
        self.here = {"device": device_name(device), "compute_dtype": compute_dtype(device, cfg.precision),
                     "torch": str(torch.__version__), "packed_runs": packed, "grouped_runs": None}
        self.summary = {"status": "running", "name": cfg.name, "hash": cfg.hash, "params": count_params(model),
                        "macs": macs, "flops": 2 * macs,
                        **{k: v for k, v in self.here.items() if v is not None},  # grouped: by _Group
                        "dataset_sha256": data.info.sha256, "dataset_kind": data.info.kind,
                        "official_pixels": data.info.official_pixels, "git_commit": _git_commit(),
                        "warmup_end_step": self.warmup_end, "pid": os.getpid()}
        self.progress(self.start, self.seconds)  # what earlier sittings did stays in the summary a kill leaves

        from tqdm import tqdm  # text bars: tqdm.auto warns in a kernel without ipywidgets (papermill)

        quiet = progress is False or (progress is None and bool(os.environ.get("CI")))
        self.bar = tqdm(total=cfg.iterations, initial=self.start, desc=cfg.name, disable=quiet, leave=False,
                        mininterval=progress_interval())
        model.train()
        # Training loss/error accumulate on the device and are read only at evaluation (no per-step sync).
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss_acc, self.wrong_acc, self.win_wrong = z(), z(), z()
        self.seen, self.win_seen = 0, 0
        if acc is not None:
            self.loss_acc += acc["loss"].to(device)
            self.wrong_acc += acc["wrong"].to(device)
            self.win_wrong += acc["win_wrong"].to(device)
            self.seen, self.win_seen = int(acc["seen"]), int(acc["win_seen"])
        self.step_no = self.start
        self.status = "running"
        self.t0, self.last_ckpt = time.time(), time.time()

    @property
    def active(self) -> bool:
        return self.status == "running" and self.step_no < self.end

    def step(self) -> bool:
        """One training step (and evaluation when due); False once the run has nothing left to do."""
        if not self.active:
            return False
        with self.on_stream():
            self._step()
        return self.active

    def _step(self) -> None:
        lr = lr_at(self.cfg, self.step_no, self.warming_up)
        x, y = self.loader.batch(self.step_no)
        loss, wrong = self.stepper(x, y, lr)
        self.account(lr, loss, wrong, len(y))

    def account(self, lr: float, loss: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        """Book one step's loss and wrong count; evaluate, checkpoint and finish when due."""
        cfg, step = self.cfg, self.step_no
        self.loss_acc += loss * n
        self.wrong_acc += wrong
        self.seen += n
        if self.warming_up:  # the paper: lr 0.01 until training error < 80%, then 0.1
            self.win_wrong += wrong
            self.win_seen += n
            if (step + 1) % WARMUP_CHECK_EVERY == 0:
                if float(self.win_wrong) / self.win_seen < cfg.warmup_err:
                    self.warming_up, self.warmup_end = False, step + 1
                self.win_wrong.zero_()
                self.win_seen = 0
            if self.warming_up and cfg.milestones and step + 1 == cfg.milestones[0]:  # no answer in the recipe: say it
                log.warning("%s is still warming up (lr %g, training error >= %g) at the first milestone, "
                            "step %d; its summary will say warmup_end_step=None", cfg.name, cfg.warmup_lr,
                            cfg.warmup_err, step + 1)
        self.bar.update(1)
        done = self.step_no = step + 1
        if done % cfg.eval_every == 0 or done == cfg.iterations:
            train_loss = float(self.loss_acc) / self.seen
            train_err = float(self.wrong_acc) / self.seen
            self.pull()
            test_loss, test_err = evaluate(self.model, eval_batches(self.ex, self.ey), EVAL_PRECISION)
            now = time.time()
            self.rows.append(dict(step=done, epoch=done / self.loader.steps_per_epoch, lr=lr, train_loss=train_loss,
                                  train_err=train_err, test_loss=test_loss, test_err=test_err,
                                  seconds=self.seconds + now - self.t0))
            self.loss_acc.zero_(), self.wrong_acc.zero_()
            self.seen = 0
            atomic_write_csv(pd.DataFrame(self.rows, columns=METRIC_COLUMNS), self.rd.metrics_file)
            self.bar.set_postfix(train_err=f"{train_err:.3f}", test_err=f"{test_err:.3f}")
            if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                self.status = "diverged"  # NaN/inf: recorded, not a crash
                return
            if done < self.end and now - self.last_ckpt >= self.checkpoint_every_s:
                self._checkpoint(done, self.seconds + now - self.t0)
                self.last_ckpt = time.time()
        if done == self.cfg.iterations:
            self.status = "done"

    def pull(self) -> None:
        """Bring the model and optimizer up to date when a `_Group` trains this run."""
        if self.group is not None:
            self.group.pull(self)

    def all_sittings(self, step: int) -> list[dict[str, Any]]:
        """Every sitting of this run up to `step`, this one last: where and how each stretch of steps ran
        (a paper run may start on a GPU and end elsewhere)."""
        if step <= self.start:
            return list(self.sittings)
        now = {"from_step": self.start, "to_step": step, **{k: self.here[k] for k in SITTING_FIELDS},
               "step_mode": self.stepper.label, "seconds": round(time.time() - self.t0, 3)}
        return self.sittings + [now]

    def progress(self, step: int, seconds: float) -> None:
        """Write the summary of a run still under way at `step` (its newest checkpoint, or where it starts):
        steps, sittings, last evaluation. Manifests, exports and `--list` read progress from it, so a sitting
        killed later (a call's limit, a lease's end) still shows, and ships, the checkpoint it left."""
        sittings = self.all_sittings(step)
        last = next((r for r in reversed(self.rows) if r["step"] <= step), {})
        for k in ("device", "compute_dtype"):  # a run trained on two devices says so where tables read it
            seen = list(dict.fromkeys(str(x[k]) for x in sittings or [self.here] if x.get(k) is not None))
            self.summary[k] = JOINED.join(seen)  # only sittings that trained: a start killed at once names none
        modes = list(dict.fromkeys(str(x["step_mode"]) for x in sittings if x.get("step_mode")))
        if modes:  # likewise a run stepped eagerly in one sitting and as a graph in another ("eager + graph")
            self.summary["step_mode"] = JOINED.join(modes)
        self.summary.update(steps_done=step, wall_seconds=seconds, sittings=sittings,
                            warmup_end_step=self.warmup_end, final_train_err=last.get("train_err"),
                            final_test_err=last.get("test_err"), final_train_loss=last.get("train_loss"),
                            final_test_loss=last.get("test_loss"))
        atomic_write_json(self.rd.summary_file, self.summary)

    def _checkpoint(self, step: int, seconds: float) -> None:
        self.pull()
        acc = {"loss": self.loss_acc.detach().cpu(), "wrong": self.wrong_acc.detach().cpu(), "seen": self.seen,
               "win_wrong": self.win_wrong.detach().cpu(), "win_seen": self.win_seen}
        scale = self._loss_scale()
        # Everything exact resume needs (data order is a function of (seed, step), so no loader state).
        _save_checkpoint(self.rd, {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                                   "step": step, "seconds": seconds, "warming_up": self.warming_up,
                                   "warmup_end": self.warmup_end, "torch_rng": torch.get_rng_state(),
                                   "accumulators": acc, "sittings": self.all_sittings(step), **scale})
        if self.status == "running":  # a finished run's summary is written by _finish
            self.progress(step, seconds)

    def _loss_scale(self) -> dict:
        """fp16's loss-scale state for a checkpoint (absent for other precisions), noted in the summary too:
        a sitting cut off by a time limit leaves the summary of its last checkpoint."""
        sc = self.stepper.scaler  # a grouped run's stepper is its group's, never fp16
        if sc is None:
            return {}
        state = sc.state_dict()
        self.summary.update(loss_scale=float(state["scale"]), fp16_skipped_steps=int(state["skipped"]))
        return {"loss_scale": state}

    def finish(self) -> RunRecord:
        """Store the outcome: model and final summary when done, a checkpoint when stopped early."""
        with self.on_stream():
            return self._finish()

    def _finish(self) -> RunRecord:
        self.bar.close()
        rd, status = self.rd, self.status
        seconds = self.seconds + time.time() - self.t0
        done_steps = self.rows[-1]["step"] if status == "diverged" else self.step_no
        if status == "running":  # stopped early on purpose: checkpoint so the next call resumes here
            self._checkpoint(self.step_no, seconds)
        else:
            self.pull()
            model_cpu = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            atomic_save_torch(model_cpu, rd.model_file)
        st = self.stepper
        self.summary.update(status=status, step_mode=st.label, step_mode_reason=st.reason, graph_check=st.check)
        if st.compiled or st.compile_reason:  # asked for: whether it ran, and how close to the plain step
            self.summary.update(compile_reason=st.compile_reason, compile_check=st.compile_check)
        self._loss_scale()  # fp16: the scale, and the steps skipped for inf/NaN gradients over every sitting
        self.progress(done_steps, seconds)  # diverged: its last evaluation is where the run stands
        if status in FINISHED:
            _drop_checkpoints(rd)
        self.group = None  # run <-> group is a cycle: without this, a grouped pack's GPU memory waits for gc
        return _record(rd)

    def fail(self, e: BaseException) -> None:
        self.bar.close()
        self.group = None
        self.summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        atomic_write_json(self.rd.summary_file, self.summary)


def deadline_after(time_budget_s: float | None) -> float | None:
    """The `time.monotonic()` at which a budget of this many seconds ends (None: no budget; 0: a run that
    starts takes one step and leaves with a checkpoint)."""
    if time_budget_s is None:
        return None
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not time_budget_s >= 0:
        raise ValueError(f"time_budget_s={time_budget_s!r} is not valid: use a number of seconds >= 0, or None "
                         "(no limit)")
    return time.monotonic() + time_budget_s


def checkpoint_mib(cfg: RunConfig) -> float:
    """A run's checkpoint in MiB, from its model: weights, buffers and SGD momentum (one more copy of the
    weights), and about 1 KiB a tensor for the file's bookkeeping; ResNet-110's is about 14 (13.5 on disk)."""
    return _checkpoint_mib(dataclasses.replace(cfg, seed=0))  # seeds share a net: one build for all of them


@functools.lru_cache(maxsize=None)
def _checkpoint_mib(cfg: RunConfig) -> float:
    with torch.random.fork_rng(devices=[]):  # the model's init draws: the caller's generator stays as it was
        model = model_from_config(cfg)
    params, buffers = list(model.parameters()), list(model.buffers())
    size = sum(8 * p.numel() for p in params) + sum(b.numel() * b.element_size() for b in buffers)
    return (size + 1024 * (2 * len(params) + len(buffers))) / 2**20


def check_pack_mb(pack_mb: Any) -> float | None:
    """`pack_mb` (MiB of checkpoints a pack may hold; None: no limit), or a ValueError naming it."""
    if pack_mb is not None and not (is_number(pack_mb) and pack_mb > 0):
        raise ValueError(f"pack_mb={pack_mb!r} is not valid: use a positive number of MiB, or None (no limit)")
    return pack_mb


def pack_chunks(cfgs: list[RunConfig], order: list[int], pack: int, pack_mb: float | None = None
                ) -> list[list[int]]:
    """`order` (indices of `cfgs`) cut into packs, each in the order given: graph-stepped runs apart from eager
    ones (a pack steps in lockstep, so an eager run would hold graph-stepped mates to its pace), at most `pack`
    runs, and with `pack_mb` at most that many MiB of checkpoints (`checkpoint_mib`; a run larger alone is a
    pack of its own). A GPU session stops its last pack part-way, and those runs' checkpoints must go back
    with the call's files and into the next session's call, both under the device tool's 64 MiB: four
    110-layer nets (about 56 MiB) would not, and whichever did not would start again at step 0."""
    check_pack(pack)
    check_pack_mb(pack_mb)
    chunks: list[list[int]] = []
    for part in ([i for i in order if cfgs[i].fast], [i for i in order if not cfgs[i].fast]):
        chunk: list[int] = []
        mib = 0.0
        for i in part:
            size = checkpoint_mib(cfgs[i]) if pack_mb is not None and pack > 1 else 0.0  # one a pack: no sizing
            if chunk and (len(chunk) == pack or (pack_mb is not None and mib + size > pack_mb)):
                chunks.append(chunk)
                chunk, mib = [], 0.0
            chunk.append(i)
            mib += size
        if chunk:
            chunks.append(chunk)
    return chunks


def train_many(cfgs: Iterable[RunConfig], root: str | os.PathLike | None = None,
               device: str | torch.device | None = None, data: Cifar10 | None = None, pack: int = 1,
               progress: bool | None = None, stop_after: int | None = None, checkpoint_every_s: float = 120.0,
               time_budget_s: float | None = None, group: bool = False, deadline: float | None = None,
               pack_mb: float | None = None) -> list[RunRecord | None]:
    """Train several configs, `pack` at a time in lockstep on one device (each on its own CUDA stream).

    Small nets leave most of a big GPU idle; packed, their kernels overlap. Runs already finished are
    read from the store; a run that fails is stored as failed and the others go on (its entry is None).
    The order of steps inside one run is the same as `train`'s, so a packed run learns what a lone
    run learns (bit-exact on the CPU). Runs stopped part-way (with a checkpoint) go first, then the others
    in the order given: a time budget then leaves one pack unfinished, not a new one beside an older one.
    pack_mb: at most this many MiB of checkpoints in a pack (`pack_chunks`).

    group: runs of one pack that differ only in seed train as one grouped net (`grouped.GroupedNets`,
    one set of kernels for all; equal to lone runs up to float rounding); seeds of a config are
    moved next to each other so they share a pack. A failure then fails the whole group.

    deadline: a `time.monotonic()` to stop at, for a caller whose one budget spans several calls
    (`experiments.train_all`); with time_budget_s too, the earlier of the two. A config given twice
    trains once (a pack would otherwise wait for ever on its own lock); both entries get its record.
    """
    device = resolve_device(device)
    check_pack(pack)
    check_pack_mb(pack_mb)
    data = data if data is not None else load_cifar10()
    ends = [d for d in (deadline_after(time_budget_s), deadline) if d is not None]
    deadline = min(ends) if ends else None
    if device.type == "cpu":
        _set_cpu_threads()
    cfgs = [resolve_dataset(c, data) for c in cfgs]
    index_of: dict[str, int] = {}  # each run's first place in the list
    for i, cfg in enumerate(cfgs):
        index_of.setdefault(cfg.hash, i)
    out: dict[int, RunRecord | None] = {}
    todo = []
    resumes: dict[int, bool] = {}  # stopped part-way, with a checkpoint: trained first (below)
    for i, cfg in enumerate(cfgs):
        if index_of[cfg.hash] != i:  # the same run again
            continue
        rd = RunDir(cfg, root)
        if rd.status() in FINISHED and not stranded(rd.path):
            out[i] = _finished(rd)
        else:
            todo.append(i)
            resumes[i] = can_resume(rd.path)
    # the schedule's length, not the preset's name, decides (a quick config given 64k iterations is as long)
    slow = [cfgs[i] for i in todo if cfgs[i].iterations * cfgs[i].batch_size >= CPU_LONG_IMAGES] \
        if device.type == "cpu" else []
    if slow:  # a researcher who set preset="paper" in a notebook on a laptop should know before the first step
        log.warning("%d run(s) with a long schedule on the CPU (%s; preset %s): up to %s iterations of batch %d, "
                    "hours to days here; such schedules are meant for a GPU (README: 'On the GPU machine'), the "
                    "quick preset shows the trends in minutes. Runs checkpoint as they go, so stopping now loses "
                    "little.", len(slow), ", ".join(sorted({c.name for c in slow})),
                    ", ".join(sorted({c.preset for c in slow})), f"{max(c.iterations for c in slow):,}",
                    max(c.batch_size for c in slow))
    todo.sort(key=lambda i: not resumes[i])  # stable: else in the order given
    if group:  # seeds of one config side by side, where the first of them stands (the sort is stable); resumed
        # seeds apart from new ones (a group steps from one start step): they stay ahead of every new run
        keys = {i: (group_key(cfgs[i]) or i, resumes[i]) for i in todo}
        first: dict = {}
        for n, i in enumerate(todo):
            first.setdefault(keys[i], n)
        todo.sort(key=lambda i: first[keys[i]])
    # packs holding a resumed run first: the graph/eager split would otherwise leave a resumed eager run waiting
    chunks = sorted(pack_chunks(cfgs, todo, pack, pack_mb), key=lambda c: not any(resumes[i] for i in c))
    for chunk in chunks:
        if deadline is not None and time.monotonic() >= deadline:
            break
        try:
            out.update(_train_pack([cfgs[i] for i in chunk], chunk, root, device, data, progress, stop_after,
                                   checkpoint_every_s, deadline, group))
        except Exception as e:  # e.g. a run folder cannot be locked: this pack is lost, the next ones go on
            log.error("runs %s failed: %s", ", ".join(cfgs[i].name for i in chunk), e)
            for i in chunk:  # but a member it finished and stored before the error is finished
                rd = RunDir(cfgs[i], root)
                out[i] = _record(rd) if rd.status() in FINISHED else None
    for i in set(index_of.values()) - set(out):  # not started before the deadline
        rd = RunDir(cfgs[i], root)
        out[i] = _record(rd) if rd.summary() else None
    return [out[index_of[c.hash]] for c in cfgs]


def group_key(cfg: RunConfig) -> RunConfig | None:
    """Runs with equal keys differ only in seed and can train as one `GroupedNets`; None: never grouped
    (a warm-up ends at a step of its own for each seed; fp16's loss scale skips a step for all members)."""
    return None if cfg.warmup_lr is not None or cfg.precision == "fp16" else dataclasses.replace(cfg, seed=0)


class _Group:
    """Runs that differ only in seed, trained as one grouped net: one set of kernels for all.

    Each run keeps its own data order, evaluation, metrics, checkpoints and summary; `pull` copies
    its weights, BN statistics and momentum out of the grouped net whenever the run reads or stores
    them, so its files are those of a run trained alone (and resume alone, or grouped).
    """

    def __init__(self, runs: list[_Run]):
        from .grouped import CatLoader, GroupedNets

        self.runs, cfg = runs, runs[0].cfg
        self.loader = CatLoader([r.loader for r in runs])
        with runs[0].on_stream():
            self.model = to_device(GroupedNets([r.model for r in runs]), runs[0].device)
            opt, lr_t = make_optimizer(self.model, cfg.lr, cfg.momentum, cfg.weight_decay)
            members = [list(r.model.parameters()) for r in runs]
            for j, p in enumerate(self.model.parameters()):  # resumed runs bring their momentum
                bufs = [r.opt.state.get(ps[j], {}).get("momentum_buffer") for r, ps in zip(runs, members)]
                if all(b is not None for b in bufs):
                    opt.state[p]["momentum_buffer"] = torch.cat(bufs)
            match_momentum_layout(opt)  # the fused kernel needs each buffer laid out as its parameter
            self.stepper = Stepper(self.model, opt, lr_t, cfg.precision, fast=cfg.fast, members=len(runs),
                                   compile=cfg.compile)
        for r in runs:
            r.group, r.stepper = self, self.stepper
            r.summary["grouped_runs"] = r.here["grouped_runs"] = len(runs)

    def step(self) -> None:
        live = [r for r in self.runs if r.active]
        if not live:
            return
        step = live[0].step_no
        with live[0].on_stream():
            lr = lr_at(live[0].cfg, step, False)
            x, y = self.loader.batch(step)  # every member's batch: a diverged one still rides along
            loss, wrong = self.stepper(x, y, lr)
            for i, r in enumerate(self.runs):
                if r.active:
                    r.account(lr, loss[i], wrong[i], len(y) // len(self.runs))

    @torch.no_grad()
    def pull(self, run: _Run) -> None:
        i, n = self.runs.index(run), len(self.runs)
        run.model.load_state_dict(self.model.member_state_dict(i))
        for gp, mp in zip(self.model.parameters(), run.model.parameters()):
            buf = self.stepper.opt.state.get(gp, {}).get("momentum_buffer")
            if buf is not None:
                run.opt.state[mp]["momentum_buffer"] = buf.chunk(n)[i].clone()
        match_momentum_layout(run.opt)


def _units(runs: dict[int, _Run], keys: list) -> list[tuple[list[int], Callable[[], object]]]:
    """What the lockstep loop steps: lone runs, and groups of runs that share a key and a start step."""
    units, placed = [], set()
    for k, run in runs.items():
        if k in placed:
            continue
        mates = [j for j, r in runs.items() if keys[k] is not None and keys[j] == keys[k] and r.start == run.start]
        mates = mates or [k]
        placed.update(mates)
        if len(mates) > 1:
            try:
                units.append((mates, _Group([runs[j] for j in mates]).step))
                continue
            except Exception as e:  # grouping is only for speed: train them one by one
                log.warning("runs %s not grouped (%s); training them one by one",
                            ", ".join(runs[j].cfg.name for j in mates), e)
        units += [([j], runs[j].step) for j in mates]
    return units


def _train_pack(cfgs: list[RunConfig], index: list[int], root, device: torch.device, data: Cifar10,
                progress: bool | None, stop_after: int | None, checkpoint_every_s: float,
                deadline: float | None, group: bool = False) -> dict[int, RunRecord | None]:
    out: dict[int, RunRecord | None] = {}
    dirs = [RunDir(c, root) for c in cfgs]
    keys = [group_key(c) if group else None for c in cfgs]
    with contextlib.ExitStack() as locks:
        runs: dict[int, _Run] = {}
        # locks in hash order, so two processes packing overlapping sets cannot deadlock; with a time budget none
        # is waited for (nor can deadlock): a run another process holds is left to it, the pack goes on without
        held: set[int] = set()
        for k in sorted(range(len(cfgs)), key=lambda k: cfgs[k].hash):
            try:
                locks.enter_context(lock_run(dirs[k].path, wait=deadline is None))
            except RunLocked:
                held.add(k)
            except OSError as e:
                raise ResultsWriteError(f"cannot lock run {cfgs[k].hash} under {dirs[k].path}: {e}") from e
        interrupted = locks.enter_context(_ctrl_c_after_step())  # after the locks: waiting for one stays Ctrl-C-able
        streams: list[torch.cuda.Stream | None] = [None] * len(cfgs)
        if device.type == "cuda" and len(cfgs) > 1:
            shared: dict = {}  # runs that may be grouped share a stream
            for k, key in enumerate(keys):
                streams[k] = (shared.get(key) if key is not None else None) or torch.cuda.Stream(device)
                if key is not None:
                    shared[key] = streams[k]
        for k, (cfg, rd) in enumerate(zip(cfgs, dirs)):
            if k in held:
                out[index[k]] = _locked(rd)
                continue
            recover_stranded(rd.path)
            if rd.status() in FINISHED:  # another process finished it while we waited
                out[index[k]] = _finished(rd)
                continue
            try:
                runs[k] = _Run(cfg, rd, device, data, progress, stop_after, checkpoint_every_s, streams[k],
                               packed=len(cfgs) - len(held))
            except Exception as e:
                log.error("run %s could not start: %s", cfg.name, e)
                _store_failure(rd, cfg, e)
                out[index[k]] = None
        units = _units(runs, keys)
        while units:
            for unit in list(units):
                ks, step = unit
                try:
                    step()
                except Exception as e:  # this run (or group) fails; the packed others go on
                    for k in ks:
                        if k in runs:
                            log.error("run %s failed: %s", runs[k].cfg.name, e)
                            runs.pop(k).fail(e)
                            out[index[k]] = None
                for k in ks:  # store finished runs now (model file, summary) rather than when the pack ends
                    if k in runs and not runs[k].active:
                        out[index[k]] = _finish(runs.pop(k))
                if not any(k in runs for k in ks):
                    units.remove(unit)
            if interrupted() or deadline is not None and time.monotonic() >= deadline:
                break
        for k, run in runs.items():  # stopped by the deadline or Ctrl-C: checkpoints, resumed by the next call
            out[index[k]] = _finish(run)
    if interrupted():  # no further pack starts
        raise _stopped([r for r in out.values() if r is not None and r.status == "running"])
    return out


def _finish(run: _Run) -> RunRecord | None:
    try:
        return run.finish()
    except Exception as e:
        log.error("run %s could not be stored: %s", run.cfg.name, e)
        run.fail(e)
        return None


def _store_failure(rd: RunDir, cfg: RunConfig, e: BaseException) -> None:
    """Mark a run that could not start as failed, keeping what its summary said of earlier sittings (steps
    done, device): its checkpoint survives, and import and `--list` rank the run by that progress."""
    with contextlib.suppress(OSError):
        atomic_write_json(rd.summary_file, {**(rd.summary() or {}), "status": "failed", "name": cfg.name,
                                            "hash": cfg.hash, "error": f"{type(e).__name__}: {e}"})
