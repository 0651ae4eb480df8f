"""`resnet-lab bench`: images/s of our training loop against the loop most PyTorch CIFAR repos write,
both measured in the same process on the same device, and the ratio.

Baseline: eager fp32 model; a Dataset of PIL images with torchvision RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize; DataLoader(batch_size, shuffle=True, num_workers,
pin_memory on CUDA); `.item()` on the loss every step.
Ours: uint8 data resident on the device, crop/flip/normalise there in batches, bf16 autocast and
channels_last on CUDA, fused SGD, no host sync inside the step, the step captured as one CUDA graph
(`fast.Stepper`; eager where capture is unavailable, and the table says which ran). Optionally beside
it: the forward through torch.compile (--compile), and the step in loss-scaled fp16 (--fp16).
Packed: several independent ResNet-20 runs stepped together, one CUDA stream each; beside it the
same runs grouped into one net (`grouped.GroupedNets`: conv groups, one set of kernels for all).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import numbers
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_depth, is_int
from .data import MEAN, STD, Cifar10, DeviceLoader, balanced_subset, eval_batches
from .fast import Stepper, error_line, make_optimizer, to_device
from .grouped import CatLoader, GroupedNets
from .models import build_model
from .runs import atomic_write_json, atomic_write_text, results_dir
from .train import EVAL_PRECISION, device_name, device_slug, evaluate, resolve_device

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

    if len(y) < batch_size:  # drop_last would leave the loader empty, and the loop below would never end
        raise ValueError(f"batch_size={batch_size} is more than the {len(y)} images given: use at most {len(y)}")
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


def _ours(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int, seed: int,
          fast: bool, activation_checkpointing: int = 0, compile: bool = False, precision: str = "auto"):
    torch.manual_seed(seed)
    model = to_device(build_model("resnet", depth, activation_checkpointing=activation_checkpointing), device)
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    return (model, Stepper(model, opt, lr_t, precision, fast=fast, compile=compile),
            DeviceLoader(x, y, batch_size, seed, device))


def _timed(steppers: list, loaders: list, streams: list, device: torch.device, seconds: float, warmup: int = 3
           ) -> tuple[float, int]:
    """Lockstep steps of one or more runs (each on its stream) until `seconds` pass: (elapsed, steps each).
    CUDA's peak memory is reset after the warm-up: the peak is training's, not the capture's transient."""
    def one_round(step: int) -> None:
        for st, ld, s in zip(steppers, loaders, streams):
            with torch.cuda.stream(s) if s is not None else contextlib.nullcontext():
                st(*ld.batch(step), 0.1)

    for step in range(warmup):  # includes graph capture
        one_round(step)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, n = time.perf_counter(), 0
    while True:
        one_round(warmup + n)
        n += 1
        if n % 10 == 0 or device.type == "cpu":
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                return time.perf_counter() - t0, n


def ours_images_per_s(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                      seconds: float, warmup: int = 3, activation_checkpointing: int = 0, fast: bool = True
                      ) -> tuple[float, float, dict[str, float | None], str, str | None]:
    """(images/s, seconds per step, peak memory in MiB, step mode, why not graph) of our step."""
    _fresh_peak(device)
    model, st, ld = _ours(depth, x, y, device, batch_size, 0, fast, activation_checkpointing)
    dt, n = _timed([st], [ld], [None], device, seconds, warmup)
    return n * batch_size / dt, dt / n, peak_mb(device), st.mode, st.reason


def fp16_images_per_s(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                      seconds: float) -> tuple[float, float, str, str | None, int]:
    """Our step in fp16 with its loss scale (cuDNN BatchNorm on CUDA, where bf16 gets the native kernels):
    (images/s, seconds per step, step mode, why not graph, steps skipped for inf/NaN gradients)."""
    _fresh_peak(device)
    model, st, ld = _ours(depth, x, y, device, batch_size, 0, True, precision="fp16")
    dt, n = _timed([st], [ld], [None], device, seconds)
    return n * batch_size / dt, dt / n, st.mode, st.reason, int(st.scaler.skipped)


def compiled_images_per_s(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                          seconds: float) -> tuple[float, float, float, str, str | None, int]:
    """Our step with each block through torch.compile: (images/s, seconds per step, seconds of the first
    step (compile from an empty dynamo cache, its check against the plain step, capture), step label, why
    it is not compiled or not a graph, graphs dynamo compiled for the net)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    _fresh_peak(device)
    torch._dynamo.reset()  # every net from an empty cache: compile_s is this net's, not what an earlier one left
    before = counters["stats"]["unique_graphs"]
    model, st, ld = _ours(depth, x, y, device, batch_size, 0, True, compile=True)
    t0 = time.perf_counter()
    st(*ld.batch(0), 0.1)
    _sync(device)
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"] - before
    dt, n = _timed([st], [ld], [None], device, seconds)
    return n * batch_size / dt, dt / n, first, st.label, st.compile_reason or st.reason, graphs


def _fresh_peak(device: torch.device) -> None:
    """Start a peak-memory measurement from what this one allocates: the previous measurement's model and
    optimizer form a cycle, freed here before the peak resets."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device | None) -> dict[str, float | None]:
    """Peak CUDA memory in MiB: allocated (tensors) and reserved (what the device must have: the
    caching allocator's blocks, including a captured graph's private pool); None on a CPU or None device."""
    cuda = device is not None and device.type == "cuda"
    return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None}


def eval_seconds(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, images: int = 10_000) -> float:
    """Seconds for one evaluation pass over `images` test images (the paper schedule does 64)."""
    torch.manual_seed(0)
    model = to_device(build_model("resnet", depth), device)
    xd, yd = x.to(device), y.to(device)
    evaluate(model, eval_batches(xd, yd), EVAL_PRECISION)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    evaluate(model, eval_batches(xd, yd), EVAL_PRECISION)
    _sync(device)
    return (time.perf_counter() - t0) * images / len(y)


def packed_images_per_s(depth: int, n_runs: int, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                        batch_size: int, seconds: float) -> tuple[float, list[str]]:
    """Aggregate images/s of `n_runs` independent runs stepped in lockstep, one CUDA stream each."""
    parts = [_ours(depth, x, y, device, batch_size, seed, fast=True) for seed in range(n_runs)]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in parts]
    for s in streams:  # the models and data were put on the GPU by the default stream
        if s is not None:
            s.wait_stream(torch.cuda.current_stream(device))
    dt, n = _timed([p[1] for p in parts], [p[2] for p in parts], streams, device, seconds)
    return n_runs * n * batch_size / dt, [p[1].mode for p in parts]


def grouped_images_per_s(depth: int, n_runs: int, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                         batch_size: int, seconds: float) -> tuple[float, str]:
    """Aggregate images/s of `n_runs` ResNets trained as one grouped net (our step, one stream)."""
    nets = []
    for seed in range(n_runs):
        torch.manual_seed(seed)
        nets.append(build_model("resnet", depth))
    model = to_device(GroupedNets(nets), device)
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    st = Stepper(model, opt, lr_t, "auto", members=n_runs)
    ld = CatLoader([DeviceLoader(x, y, batch_size, seed, device) for seed in range(n_runs)])
    dt, n = _timed([st], [ld], [None], device, seconds)
    return n_runs * n * batch_size / dt, st.mode


def profile_ours(depth: int, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                 steps: int = 20) -> tuple[str, float | None]:
    """(top-ops table, GPU-busy fraction) of `steps` of our step: where the time goes when a target
    is missed (launch-bound: busy fraction far below 1; kernel-bound: close to it)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts):  # the profiler set up before the graph is captured: replaying a graph
        pass                        # captured first under a profiler can fail (pytorch#75504)
    _, st, ld = _ours(depth, x, y, device, batch_size, 0, fast=True)
    for step in range(5):  # capture and warm-up outside the profile
        st(*ld.batch(step), 0.1)
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for step in range(5, 5 + steps):
            st(*ld.batch(step), 0.1)
        _sync(device)
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    busy = None
    if device.type == "cuda":  # kernel time (self, so nothing counted twice) over wall time
        from torch.autograd import DeviceType

        kernels = [e for e in ka if e.device_type == DeviceType.CUDA]  # kernel rows only: ops would count twice
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / wall
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = f"resnet-{depth}, {steps} steps of batch {batch_size}, {st.mode} step, {wall:.3f} s wall"
    if busy is not None:
        head += f", GPU busy {100 * busy:.0f}% of the wall time"
    return head + "\n" + ka.table(sort_by=sort, row_limit=25), busy


CKPT_SEGMENTS = 2  # what a GPU under ~10 GiB trains ResNet-1202 with (sweeps/thousand_layers.yaml says so)
DEEP = 200  # nets deeper than this train alone (experiments.LONE_DEPTH): measured after the packs
PROFILE_STEPS = {True: 3, False: 20}  # deep nets: a 1202-layer step is ~17k kernels, 20 of them take long to profile


PAPER_STEPS, PAPER_EVALS = 64_000, 64  # the paper preset's schedule: iterations, evaluations of 10k images


def _schedule_min(step_s: float | None, eval_s: float | None) -> float | None:
    """Minutes of the paper schedule at this step time, its evaluations included (None if either is)."""
    return None if step_s is None or eval_s is None else (PAPER_STEPS * step_s + PAPER_EVALS * eval_s) / 60


def check_tag(tag: str | None) -> None:
    """A bench tag names files: letters, digits, '-' and '_' only."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", tag):
        raise ValueError(f"--tag {tag!r} is not valid: use letters, digits, '-' and '_' (it names files)")


def check_args(models: list[int], seconds: float, batch_size: int, num_workers: int,
               packs: list[int] | None = None, out: Path | None = None, tag: str | None = None) -> None:
    """Refuse bad input before anything is measured or written: a bad value would otherwise become rows of
    errors written over this device's earlier bench, or (NaN seconds, a negative batch) a loop without end."""
    check_tag(tag)
    if not models:
        raise ValueError("--models is empty: give comma-separated depths, e.g. 20,56,110")
    for m in models:
        try:
            check_depth(m)
        except ValueError as e:
            raise ValueError(f"--models: {e}") from None
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--seconds {seconds!r} is not valid: use a finite number of seconds > 0 (each loop is "
                         "timed that long)")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r} is not valid: use a positive integer (images per step)")
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"--num-workers {num_workers!r} is not valid: use an integer >= 0 (the baseline "
                         "DataLoader's worker processes; 0 loads in the main process)")
    if packs is not None and any(not is_int(n) or n < 1 for n in packs):
        raise ValueError(f"packs={packs!r} is not valid: use run counts >= 1, e.g. [1, 2, 4, 8]")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is not a folder (a file is in the way): give a folder for "
                         "<device>.json/.md")


def run_bench(models: list[int], device: str = "auto", seconds: float = 10.0, batch_size: int = 128,
              num_workers: int = 4, images: int = 50_000, checkpointing: bool = False, out: Path | None = None,
              data: Cifar10 | None = None, packs: list[int] | None = None, pack_depth: int = 20, profile: bool = False,
              ckpt_min_depth: int = DEEP + 1, compile: bool = False, fp16: bool = False, tag: str | None = None
              ) -> dict[str, Any]:
    """Benchmark each depth: baseline vs ours (graph and eager), checkpointing, packed runs; JSON + markdown.

    images: training images both loops draw from; all 50k by default, so the baseline's DataLoader
    starts a new epoch (and refills its workers' queue) every 390 steps, as in real training.
    Order, for a call that a time limit may cut: the nets up to DEEP layers, the packed runs, the deeper
    nets, then fp16 and compile for each net (a capture failing there must not turn the graph rows eager), then
    the profiles (a profiler leaves CUPTI attached, which would slow every later timing); the
    files are rewritten after every measurement. checkpointing: timed with CKPT_SEGMENTS segments for nets
    of ckpt_min_depth layers or more (the shallower ones fit without it). compile: also time our step with
    each residual block through torch.compile (blocks of one shape share a compiled graph, so deep nets too).
    fp16: also time our step in fp16 with its loss scale (precision="fp16"), every net.
    tag: appended to the files' names (<device>-<tag>.json), so a later bench on one device keeps the earlier.
    """
    check_args(models, seconds, batch_size, num_workers, packs, out, tag)
    dev = resolve_device(device)
    if data is None:
        from .data import load_cifar10

        data = load_cifar10()
    x, y = balanced_subset(data.train_x, data.train_y, images, seed=0)
    ex, ey = balanced_subset(data.test_x, data.test_y, min(images, len(data.test_y)), seed=0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []
    packed: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    result = {"device": device_name(dev), "device_type": dev.type, "torch": str(torch.__version__),
              "machine": platform.machine(), "kernel": platform.release(),  # 4.4.0: gVisor's, syscalls are slower
              "batch_size": batch_size, "seconds_per_measurement": seconds,
              "num_workers": num_workers, "images": images, "rows": rows, "packed": packed, "complete": False}
    out = out or results_dir() / "bench"
    slug = device_slug(result["device"])  # "cpu-x86-64-2-threads", "nvidia-h100-..."
    slug += f"-{tag}" if tag else ""
    paths = [out / f"{slug}.json", out / f"{slug}.md"] + ([out / f"{slug}-profile.txt"] if profile else [])

    def save() -> None:  # after every measurement: a call cut off by its time limit keeps what it measured
        atomic_write_json(paths[0], result)
        atomic_write_text(paths[1], markdown(result))
        if profile:
            atomic_write_text(paths[2], "\n\n".join(profiles.values()))

    def attempt(row: dict[str, Any], what: str, fn):
        return _attempt(row, what, dev, fn)

    def model_row(depth: int) -> None:
        row: dict[str, Any] = {"model": f"resnet-{depth}"}
        rows.append(row)

        def baseline() -> tuple[float, dict[str, float | None]]:
            _fresh_peak(dev)
            return baseline_images_per_s(depth, x, y, dev, batch_size, seconds, num_workers), peak_mb(dev)

        base = attempt(row, "baseline", baseline)
        row.update(baseline_img_s=base[0] if base else None,  # its 64k iterations, training steps only
                   baseline_train_min=PAPER_STEPS * batch_size / base[0] / 60 if base else None)
        save()
        got = attempt(row, "ours", lambda: ours_images_per_s(depth, x, y, dev, batch_size, seconds))
        ours, step_s, peak, mode, reason = got or (None, None, peak_mb(None), None, None)
        row.update(ours_img_s=ours, speedup=_ratio(ours, row["baseline_img_s"]), ours_mode=mode,
                   ours_step_ms=None if step_s is None else 1000 * step_s)
        save()
        ev = attempt(row, "eval", lambda: eval_seconds(depth, ex, ey, dev))
        row.update(eval_10k_s=ev, paper_schedule_min=_schedule_min(step_s, ev), **peak,
                   **{f"baseline_{k}": v for k, v in (base[1] if base else peak_mb(None)).items()})
        save()
        if dev.type == "cuda":  # what the graph buys over our own eager step
            eager = attempt(row, "eager", lambda: ours_images_per_s(depth, x, y, dev, batch_size, seconds,
                                                                    fast=False)[0])
            row.update(ours_eager_img_s=eager, graph_gain=_ratio(ours, eager))
            save()
        if checkpointing and depth >= ckpt_min_depth:
            ck = attempt(row, "ckpt", lambda: ours_images_per_s(depth, x, y, dev, batch_size, seconds,
                                                                activation_checkpointing=CKPT_SEGMENTS))
            row.update(ckpt_segments=CKPT_SEGMENTS, ckpt_step_ms=None if ck is None else 1000 * ck[1],
                       ckpt_schedule_min=_schedule_min(ck[1] if ck else None, ev),
                       **{f"ckpt_{k}": v for k, v in (ck[2] if ck else peak_mb(None)).items()})
        if reason and mode != "graph":
            row["ours_mode_reason"] = reason
        _errors_last(row)
        log.info("%s", row)
        save()

    def variants_row(depth: int, row: dict[str, Any]) -> None:
        """fp16 and torch.compile beside the graph step: after every graph row and pack, since a capture that
        raises marks the process (`fast._capture_failed`) and every later step would be eager."""
        ours, ev = row.get("ours_img_s"), row.get("eval_10k_s")
        if fp16:
            h = attempt(row, "fp16", lambda: fp16_images_per_s(depth, x, y, dev, batch_size, seconds))
            if h:
                row.update(fp16_img_s=h[0], fp16_gain=_ratio(h[0], ours), fp16_speedup=_ratio(h[0], row["baseline_img_s"]),
                           fp16_step_ms=1000 * h[1], fp16_schedule_min=_schedule_min(h[1], ev), fp16_mode=h[2],
                           fp16_skipped_steps=h[4])
                if h[3] and h[2] != "graph":
                    row["fp16_mode_reason"] = h[3]
            save()
        if compile:
            comp = attempt(row, "compiled", lambda: compiled_images_per_s(depth, x, y, dev, batch_size, seconds))
            if comp:
                row.update(compiled_img_s=comp[0], compile_gain=_ratio(comp[0], ours),
                           compiled_speedup=_ratio(comp[0], row["baseline_img_s"]), compiled_step_ms=1000 * comp[1],
                           compiled_schedule_min=_schedule_min(comp[1], ev),
                           compile_s=comp[2], compiled_graphs=comp[5], compiled_mode=comp[3])
                if comp[4] and comp[3] != "graph+compile":
                    row["compiled_mode_reason"] = comp[4]
            save()
        _errors_last(row)
        log.info("%s", row)
        save()

    def pack_row(n: int) -> None:
        entry: dict[str, Any] = {"model": f"resnet-{pack_depth}", "runs": n}
        packed.append(entry)
        agg = attempt(entry, "packed", lambda: packed_images_per_s(pack_depth, n, x, y, dev, batch_size, seconds))
        entry.update(aggregate_img_s=agg[0] if agg else None, modes=",".join(agg[1]) if agg else None)
        save()
        grp = attempt(entry, "grouped", lambda: grouped_images_per_s(pack_depth, n, x, y, dev, batch_size, seconds))
        entry.update(grouped_img_s=grp[0] if grp else None, grouped_mode=grp[1] if grp else None)
        one = packed[0]["aggregate_img_s"] if packed[0]["runs"] == 1 else None  # both ways against one run alone
        entry.update(vs_one=_ratio(entry["aggregate_img_s"], one), grouped_vs_one=_ratio(entry["grouped_img_s"], one))
        _errors_last(entry)
        log.info("%s", entry)
        save()

    shallow, deep = [d for d in models if d <= DEEP], [d for d in models if d > DEEP]
    for depth in shallow:
        model_row(depth)
    for n in packs or []:
        pack_row(n)
    for depth in deep:
        model_row(depth)
    if fp16 or compile:  # the paths not yet seen on a GPU, after what the graph step measures (see variants_row)
        for depth, row in zip(shallow + deep, rows):
            variants_row(depth, row)
    if profile:  # last: see the docstring
        for depth, row in zip(shallow + deep, rows):
            prof = attempt(row, "profile", lambda: profile_ours(depth, x, y, dev, batch_size,
                                                                steps=PROFILE_STEPS[depth > DEEP]))
            row["gpu_busy"] = prof[1] if prof else None
            if prof:
                profiles[row["model"]] = prof[0]
            _errors_last(row)
            save()
    result["complete"] = True
    save()
    return {**result, "paths": [str(p) for p in paths]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _errors_last(row: dict[str, Any]) -> None:
    """Move `<what>_error` keys after the numbers (the markdown's column order)."""
    row.update({k: row.pop(k) for k in [k for k in row if k.endswith("_error")]})


def _attempt(row: dict[str, Any], what: str, device: torch.device, fn):
    """fn(), or None with `<what>_error` in the row: one failed measurement (say, the fp32 baseline of a
    1202-layer net out of memory) must not cost the other numbers of a scarce GPU call."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - whatever it is, the table says it and the bench goes on
        row[f"{what}_error"] = error_line(e)
    log.warning("%s: %s failed: %s", row["model"], what, row[f"{what}_error"])
    gc.collect()  # the failed measurement's tensors, now that its traceback is gone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


TEXT_LAST = ("ours_mode_reason", "compiled_mode_reason", "fp16_mode_reason", "gpu_busy")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """Columns as first seen, numbers first, then the step mode's reason and the GPU-busy share, errors last
    (a deep net's checkpointing columns come after a shallow row's reason otherwise)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cols.sort(key=lambda c: 2 if c.endswith("_error") else 1 if c in TEXT_LAST else 0)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))
                                       for v in cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown tables (per model; packed runs)."""
    lines = [f"Device: {result['device']} · torch {result['torch']} · batch {result['batch_size']} · "
             f"{result['seconds_per_measurement']} s per measurement", ""]
    if not result.get("complete", True):
        lines[-1:] = ["", "**Incomplete**: the bench stopped before its last measurement (a time limit, Ctrl-C); "
                      "these are the measurements it finished.", ""]
    if result["rows"]:
        lines += _table(result["rows"])
    if result.get("packed"):
        lines += ["", "Packed runs (independent nets stepped together, one CUDA stream each; grouped: the same "
                  "nets as one net with conv groups):", ""]
        lines += _table(result["packed"])
    return "\n".join(lines) + "\n"
