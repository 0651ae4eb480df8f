"""The training loop: the paper's SGD recipe, periodic evaluation, atomic checkpoints, exact resume."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .data import Cifar10, DeviceLoader, eval_batches, load_cifar10, normalize, split_data
from .models import count_params, model_from_config
from .runs import METRIC_COLUMNS, RunDir, atomic_save_torch, atomic_write_csv, atomic_write_json

log = logging.getLogger(__name__)
WARMUP_CHECK_EVERY = 20


class ResultsWriteError(RuntimeError):
    """Results could not be written (disk full, permissions); nothing already stored was damaged."""  # steps between host reads of the training error during warm-up


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, error rate) of `model` in eval mode over uint8 (images, labels) batches."""
    was_training = model.training
    model.eval()
    loss_sum, wrong, n = None, None, 0
    for x, y in batches:
        dev = x.device
        with _autocast(dev, precision):
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
               precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on uint8 images; returns (loss, wrong count) as device tensors (no host sync)."""
    x = normalize(x)
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, precision):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (out.detach().argmax(1) != y).sum()


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def resolve_dataset(cfg: RunConfig, data: Cifar10) -> RunConfig:
    """Fill in which CIFAR-10 copy the run uses; a config pinned to another copy is refused."""
    sha = data.info.sha256[:16]
    if cfg.dataset and cfg.dataset != sha:
        raise ValueError(f"config asks for dataset {cfg.dataset!r} but the source {data.info.path!r} is {sha!r}")
    return dataclasses.replace(cfg, dataset=sha)


def _record(rd: RunDir) -> RunRecord:
    return RunRecord(rd.cfg, rd.path, rd.summary() or {}, rd.metrics())


def _load_checkpoint(rd: RunDir) -> dict | None:
    """Newest loadable checkpoint; a damaged one is set aside with a warning, never trusted."""
    for f in (rd.checkpoint_file, rd.path / "checkpoint.prev.pt"):
        if not f.exists():
            continue
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            bad = f.with_name(f"{f.name}.bad-{int(time.time())}")
            os.replace(f, bad)
            log.warning("checkpoint %s failed to load (%s); set aside as %s", f, e, bad.name)
    return None


def _save_checkpoint(rd: RunDir, state: dict) -> None:
    if rd.checkpoint_file.exists():  # keep the previous good one until the new one is safely on disk
        os.replace(rd.checkpoint_file, rd.path / "checkpoint.prev.pt")
    atomic_save_torch(state, rd.checkpoint_file)


def train(cfg: RunConfig, root: str | os.PathLike | None = None, device: str | torch.device | None = None,
          data: Cifar10 | None = None, progress: bool | None = None, stop_after: int | None = None,
          checkpoint_every_s: float = 120.0) -> RunRecord:
    """Train `cfg` once: a finished config is returned from the store, an interrupted one resumes.

    stop_after: leave after this many total steps with a checkpoint (as a kill would), for tests
    and for runs longer than one sitting.
    """
    device = torch.device(device) if device is not None else default_device()
    data = data if data is not None else load_cifar10()
    cfg = resolve_dataset(cfg, data)
    rd = RunDir(cfg, root)
    if rd.status() in ("done", "diverged"):
        return _record(rd)
    try:
        with rd.lock():
            if rd.status() in ("done", "diverged"):  # another process finished it while we waited
                return _record(rd)
            return _train_locked(cfg, rd, device, data, progress, stop_after, checkpoint_every_s)
    except OSError as e:  # disk full, permissions: say where; finished runs are untouched (atomic writes)
        raise ResultsWriteError(f"cannot write run {cfg.hash} ({cfg.name}) under {rd.path}: "
                                f"{e.strerror or e}") from e


def _train_locked(cfg: RunConfig, rd: RunDir, device: torch.device, data: Cifar10, progress: bool | None,
                  stop_after: int | None, checkpoint_every_s: float) -> RunRecord:
    if device.type == "cpu":
        # all the cores this process may use, or what a sweep gave it ($RESNET_LAB_THREADS)
        torch.set_num_threads(int(os.environ.get("RESNET_LAB_THREADS") or max(1, len(os.sched_getaffinity(0)))))
    atomic_write_json(rd.config_file, {**cfg.to_json(), "hash": cfg.hash})
    tx, ty, ex, ey = split_data(data, cfg.split, cfg.train_subset, cfg.eval_subset)
    ex, ey = ex.to(device), ey.to(device)
    loader = DeviceLoader(tx, ty, cfg.batch_size, cfg.seed, device)

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    from .analysis import count_macs  # FLOPs of the fresh model, before it moves to the device

    macs = count_macs(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          foreach=True)
    start, rows, seconds = 0, [], 0.0
    warming_up = cfg.warmup_lr is not None
    warmup_end = None
    ckpt = _load_checkpoint(rd)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, seconds = int(ckpt["step"]), float(ckpt["seconds"])
        warming_up, warmup_end = bool(ckpt["warming_up"]), ckpt["warmup_end"]
        rows = [r for r in rd.metrics().to_dict("records") if r["step"] <= start]  # drop rows past the checkpoint
        torch.set_rng_state(ckpt["torch_rng"])
        acc = ckpt["accumulators"]
        log.info("resuming %s at step %d", cfg.name, start)
    summary = {"status": "running", "name": cfg.name, "hash": cfg.hash, "params": count_params(model),
               "flops": macs, "device": device_name(device), "torch": torch.__version__,
               "dataset_sha256": data.info.sha256, "dataset_kind": data.info.kind,
               "official_pixels": data.info.official_pixels, "git_commit": _git_commit(),
               "steps_done": start, "warmup_end_step": warmup_end, "pid": os.getpid()}
    atomic_write_json(rd.summary_file, summary)

    from tqdm.auto import tqdm

    quiet = progress is False or (progress is None and bool(os.environ.get("CI")))
    bar = tqdm(total=cfg.iterations, initial=start, desc=cfg.name, disable=quiet, leave=False)
    model.train()
    # Training loss/error accumulate on the device and are read only at evaluation (no per-step sync).
    loss_acc = torch.zeros((), device=device)
    wrong_acc = torch.zeros((), device=device)
    seen, win_wrong, win_seen = 0, torch.zeros((), device=device), 0
    if ckpt is not None:
        loss_acc += acc["loss"].to(device)
        wrong_acc += acc["wrong"].to(device)
        win_wrong += acc["win_wrong"].to(device)
        seen, win_seen = int(acc["seen"]), int(acc["win_seen"])
    t0, last_ckpt = time.time(), time.time()
    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    status = "running"
    try:
        for step in range(start, end):
            lr = lr_at(cfg, step, warming_up)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = loader.batch(step)
            loss, wrong = train_step(model, opt, x, y, cfg.precision)
            loss_acc += loss * len(y)
            wrong_acc += wrong
            seen += len(y)
            if warming_up:  # the paper: lr 0.01 until training error < 80%, then 0.1
                win_wrong += wrong
                win_seen += len(y)
                if (step + 1) % WARMUP_CHECK_EVERY == 0:
                    if float(win_wrong) / win_seen < cfg.warmup_err:
                        warming_up, warmup_end = False, step + 1
                    win_wrong.zero_()
                    win_seen = 0
            bar.update(1)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.iterations:
                train_loss = float(loss_acc) / seen
                train_err = float(wrong_acc) / seen
                test_loss, test_err = evaluate(model, eval_batches(ex, ey), cfg.precision)
                now = time.time()
                rows.append(dict(step=done, epoch=done / loader.steps_per_epoch, lr=lr, train_loss=train_loss,
                                 train_err=train_err, test_loss=test_loss, test_err=test_err,
                                 seconds=seconds + now - t0))
                loss_acc.zero_(), wrong_acc.zero_()
                seen = 0
                atomic_write_csv(pd.DataFrame(rows, columns=METRIC_COLUMNS), rd.metrics_file)
                bar.set_postfix(train_err=f"{train_err:.3f}", test_err=f"{test_err:.3f}")
                if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                    status = "diverged"  # NaN/inf: recorded, not a crash
                    break
                if done < end and now - last_ckpt >= checkpoint_every_s:
                    _save_checkpoint(rd, _state(model, opt, done, seconds + now - t0, warming_up, warmup_end,
                                                _acc(loss_acc, wrong_acc, seen, win_wrong, win_seen)))
                    last_ckpt = time.time()
        else:
            status = "done" if end == cfg.iterations else "running"
    except BaseException as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        atomic_write_json(rd.summary_file, summary)
        raise
    finally:
        bar.close()
    seconds += time.time() - t0
    done_steps = rows[-1]["step"] if status == "diverged" else end
    if status == "running":  # stopped early on purpose: checkpoint so the next call resumes here
        _save_checkpoint(rd, _state(model, opt, end, seconds, warming_up, warmup_end,
                                        _acc(loss_acc, wrong_acc, seen, win_wrong, win_seen)))
    else:
        model_cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_save_torch(model_cpu, rd.model_file)
    last = rows[-1] if rows else {}
    summary.update(status=status, steps_done=done_steps, wall_seconds=seconds, warmup_end_step=warmup_end,
                   final_train_err=last.get("train_err"), final_test_err=last.get("test_err"),
                   final_train_loss=last.get("train_loss"), final_test_loss=last.get("test_loss"))
    atomic_write_json(rd.summary_file, summary)
    if status in ("done", "diverged"):
        for f in (rd.checkpoint_file, rd.path / "checkpoint.prev.pt"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return _record(rd)


def _acc(loss: torch.Tensor, wrong: torch.Tensor, seen: int, win_wrong: torch.Tensor, win_seen: int) -> dict:
    return {"loss": loss.detach().cpu(), "wrong": wrong.detach().cpu(), "seen": seen,
            "win_wrong": win_wrong.detach().cpu(), "win_seen": win_seen}


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int, seconds: float, warming_up: bool,
           warmup_end: int | None, accumulators: dict) -> dict:
    """Everything exact resume needs (data order is a function of (seed, step), so no loader state)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "seconds": seconds,
            "warming_up": warming_up, "warmup_end": warmup_end, "torch_rng": torch.get_rng_state(),
            "accumulators": accumulators}
