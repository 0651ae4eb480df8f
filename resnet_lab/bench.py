"""`resnet-lab bench`: images/s of our training loop against the loop most PyTorch CIFAR repos write,
both measured in the same process on the same device, and the ratio.

Baseline: eager fp32 model; a Dataset of PIL images with torchvision RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize; DataLoader(batch_size, shuffle=True, num_workers,
pin_memory on CUDA); `.item()` on the loss every step.
Ours: uint8 data resident on the device, crop/flip/normalise there in batches, bf16 autocast and
channels_last on CUDA, foreach SGD, no host sync inside the step.
"""
from __future__ import annotations

import json
import logging
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import MEAN, STD, DeviceLoader, balanced_subset
from .models import build_model
from .runs import atomic_write_json, atomic_write_text, results_dir
from .train import device_name, train_step

log = logging.getLogger(__name__)


class _PilDataset(torch.utils.data.Dataset):
    """CIFAR10-style dataset: uint8 HWC arrays -> PIL -> transforms, one image at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x = x.permute(0, 2, 3, 1).contiguous().numpy()
        self.y = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def baseline_images_per_s(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                          seconds: float, num_workers: int, warmup: int = 3) -> float:
    """The usual loop: DataLoader + torchvision transforms + eager fp32 + .item() per step."""
    import torchvision.transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dl = torch.utils.data.DataLoader(_PilDataset(x, y, tf), batch_size=batch_size, shuffle=True, drop_last=True,
                                     num_workers=num_workers, pin_memory=device.type == "cuda",
                                     persistent_workers=num_workers > 0)
    torch.manual_seed(0)
    model = build_model("resnet", depth).to(device).train()
    opt = _sgd(model)
    steps, t0, images = 0, None, 0
    while True:
        for xb, yb in dl:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the per-step logging most loops do: a host sync every step
            steps += 1
            if steps == warmup:
                _sync(device)
                t0 = time.perf_counter()
            elif t0 is not None:
                images += len(yb)
                if time.perf_counter() - t0 >= seconds:
                    _sync(device)
                    return images / (time.perf_counter() - t0)


def ours_images_per_s(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                      seconds: float, warmup: int = 3, activation_checkpointing: int = 0) -> tuple[float, float, int | None]:
    """(images/s, seconds per step, peak CUDA bytes or None) of our step on device-resident data."""
    torch.manual_seed(0)
    model = build_model("resnet", depth, activation_checkpointing=activation_checkpointing).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    loader = DeviceLoader(x, y, batch_size, seed=0, device=device)
    step = 0
    for step in range(warmup):
        train_step(model, opt, *loader.batch(step))
    _sync(device)
    t0, n = time.perf_counter(), 0
    while True:
        step += 1
        train_step(model, opt, *loader.batch(step))
        n += 1
        if n % 10 == 0 or device.type == "cpu":
            _sync(device)
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return n * batch_size / dt, dt / n, peak


def run_bench(models: list[int], device: str = "auto", seconds: float = 10.0, batch_size: int = 128,
              num_workers: int = 4, images: int = 5_000, checkpointing: bool = False, out: Path | None = None,
              data=None) -> dict[str, Any]:
    """Benchmark each depth: baseline vs ours (and checkpointing on/off); writes JSON + markdown."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if data is None:
        from .data import load_cifar10

        data = load_cifar10()
    x, y = balanced_subset(data.train_x, data.train_y, images, seed=0)
    rows = []
    for depth in models:
        base = baseline_images_per_s(depth, x, y, dev, batch_size, seconds, num_workers)
        ours, step_s, peak = ours_images_per_s(depth, x, y, dev, batch_size, seconds)
        row = {"model": f"resnet-{depth}", "baseline_img_s": base, "ours_img_s": ours, "speedup": ours / base,
               "ours_step_ms": 1000 * step_s, "paper_schedule_min": 64_000 * step_s / 60, "peak_mem_mb":
               None if peak is None else peak / 2**20}
        if checkpointing:
            ck, ck_step, ck_peak = ours_images_per_s(depth, x, y, dev, batch_size, seconds, activation_checkpointing=1)
            row.update(ckpt_step_ms=1000 * ck_step, ckpt_peak_mem_mb=None if ck_peak is None else ck_peak / 2**20)
        rows.append(row)
        log.info("%s", row)
    result = {"device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
              "machine": platform.machine(), "batch_size": batch_size, "seconds_per_measurement": seconds,
              "num_workers": num_workers, "rows": rows}
    out = out or results_dir() / "bench"
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")  # "cpu-x86-64-2-threads", "nvidia-h100-..."
    atomic_write_json(out / f"{slug}.json", result)
    atomic_write_text(out / f"{slug}.md", markdown(result))
    result["paths"] = [str(out / f"{slug}.json"), str(out / f"{slug}.md")]
    return result


def markdown(result: dict[str, Any]) -> str:
    """The benchmark as a markdown table."""
    cols = [k for k in result["rows"][0]] if result["rows"] else []
    lines = [f"Device: {result['device']} · torch {result['torch']} · batch {result['batch_size']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"
