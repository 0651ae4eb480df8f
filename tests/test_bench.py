"""The benchmark runs on the CPU with a tiny budget and writes its JSON; the fast step equals the reference."""
import functools
import json

import pytest

import torch
import torch.nn.functional as F

from resnet_lab.bench import run_bench
from resnet_lab.data import augment, normalize
from resnet_lab.models import build_model
from resnet_lab.train import train_step

from .conftest import needs_data


@needs_data
def test_bench_on_cpu_writes_json(cifar, tmp_path):
    res = run_bench([8], device="cpu", seconds=0.5, batch_size=16, num_workers=0, images=256, checkpointing=True,
                    out=tmp_path, data=cifar, packs=[1, 2], pack_depth=8, profile=True, ckpt_min_depth=8)
    saved = json.loads((tmp_path / res["paths"][0].split("/")[-1]).read_text())
    row = saved["rows"][0]
    assert row["model"] == "resnet-8" and row["baseline_img_s"] > 0 and row["ours_img_s"] > 0
    assert abs(row["speedup"] - row["ours_img_s"] / row["baseline_img_s"]) < 1e-9
    assert row["ckpt_step_ms"] > 0 and row["ckpt_segments"] == 2 and saved["device_type"] == "cpu"
    assert row["ckpt_schedule_min"] > 0 and row["eval_10k_s"] > 0 and saved["kernel"]
    assert row["baseline_train_min"] == pytest.approx(64_000 * 16 / row["baseline_img_s"] / 60)
    mem = ("peak_mem_mb", "peak_reserved_mb", "ckpt_peak_mem_mb", "ckpt_peak_reserved_mb", "baseline_peak_mem_mb")
    assert all(k in row and row[k] is None for k in mem)  # columns there, no CUDA memory to report
    assert row["ours_mode"] == "eager" and "CUDA device" in row["ours_mode_reason"]  # the fallback, said so
    assert row["paper_schedule_min"] == pytest.approx((64_000 * row["ours_step_ms"] / 1000 + 64 * row["eval_10k_s"]) / 60)
    one, two = saved["packed"]
    assert (one["runs"], two["runs"]) == (1, 2) and one["vs_one"] == 1.0 and two["aggregate_img_s"] > 0
    assert two["grouped_img_s"] > 0 and two["grouped_mode"] == "eager"  # two nets as one grouped net
    assert two["grouped_vs_one"] == pytest.approx(two["grouped_img_s"] / one["aggregate_img_s"])
    md = (tmp_path / res["paths"][1].split("/")[-1]).read_text()
    assert "| resnet-8 |" in md and "Packed runs" in md and "grouped_img_s" in md
    prof = (tmp_path / res["paths"][2].split("/")[-1]).read_text()
    assert "resnet-8, 20 steps" in prof and "convolution" in prof and row["gpu_busy"] is None  # no GPU here


def test_fast_step_equals_the_reference_step():
    torch.manual_seed(0)
    a, b = build_model("resnet", 8), build_model("resnet", 8)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    z = torch.zeros(8, dtype=torch.long)
    xa = augment(x, z, z, torch.zeros(8, dtype=torch.bool))  # no shift, no flip: the image itself
    loss, wrong = train_step(a, oa, xa, y, precision="fp32")
    out = b(normalize(x))
    ref = F.cross_entropy(out, y)
    ob.zero_grad()
    ref.backward()
    ob.step()
    assert torch.allclose(loss, ref.detach(), atol=1e-6) and int(wrong) == int((out.argmax(1) != y).sum())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@needs_data
def test_a_failed_measurement_is_reported_and_the_bench_goes_on(cifar, tmp_path, monkeypatch, capsys):
    import resnet_lab.bench as bench
    from resnet_lab import cli

    real = bench.baseline_images_per_s

    def baseline(depth, *args, **kw):
        if depth == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
        return real(depth, *args, **kw)

    monkeypatch.setattr(bench, "baseline_images_per_s", baseline)
    monkeypatch.setattr(bench, "run_bench", functools.partial(run_bench, data=cifar, images=256))
    code = cli.main(["bench", "--device", "cpu", "--models", "8,14", "--seconds", "0.2", "--batch-size", "16",
                     "--num-workers", "0", "--out", str(tmp_path / "b")])
    assert code == 1 and "failed: resnet-8 baseline: OutOfMemoryError: CUDA out of memory" in capsys.readouterr().err
    saved = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    a, b = saved["rows"]
    assert a["baseline_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert a["baseline_img_s"] is None and a["speedup"] is None and a["ours_img_s"] > 0 and a["eval_10k_s"] > 0
    header = next((tmp_path / "b").glob("*.md")).read_text().splitlines()[2]
    assert header.endswith("| baseline_error |")  # errors after the numbers in the table
    assert b["speedup"] > 0 and "baseline_error" not in b and saved["complete"]


@needs_data
def test_a_bench_cut_off_keeps_the_rows_it_finished(cifar, tmp_path, monkeypatch):
    import resnet_lab.bench as bench

    def eval_seconds(depth, *args, **kw):
        if depth == 14:
            raise KeyboardInterrupt  # what a call's time limit does, near enough: not a measurement's failure
        return 1.0

    monkeypatch.setattr(bench, "eval_seconds", eval_seconds)
    with pytest.raises(KeyboardInterrupt):
        run_bench([8, 14], device="cpu", seconds=0.2, batch_size=16, num_workers=0, images=256, out=tmp_path,
                  data=cifar)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["model"] for r in saved["rows"]] == ["resnet-8", "resnet-14"] and saved["complete"] is False
    done, cut = saved["rows"]
    assert done["eval_10k_s"] == 1.0 and "eval_10k_s" not in cut  # the cut row keeps what it measured before
    assert cut["baseline_img_s"] > 0 and cut["ours_img_s"] > 0
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| resnet-8 |" in md and "| resnet-14 |" in md and "**Incomplete**" in md


@needs_data
def test_the_bench_measures_packs_before_deep_nets_and_profiles_last(cifar, tmp_path, monkeypatch):
    """A call's time limit cuts the end: the packed table (a target) must not wait behind ResNet-1202, and a
    profiler (which leaves CUPTI attached) must not run before any timing. Checkpointing: deep nets only.
    fp16 and compile after every graph timing: a capture that raises there leaves the process eager."""
    import resnet_lab.bench as bench

    order = []
    monkeypatch.setattr(bench, "baseline_images_per_s", lambda depth, *a, **k: order.append(f"base-{depth}") or 1.0)
    monkeypatch.setattr(bench, "ours_images_per_s", lambda depth, *a, activation_checkpointing=0, **k: order.append(
        f"{'ckpt' if activation_checkpointing else 'ours'}-{depth}") or (2.0, 0.01, bench.peak_mb(None), "eager", None))
    monkeypatch.setattr(bench, "eval_seconds", lambda depth, *a, **k: 1.0)
    monkeypatch.setattr(bench, "packed_images_per_s", lambda d, n, *a, **k: order.append(f"pack-{n}") or (1.0, []))
    monkeypatch.setattr(bench, "grouped_images_per_s", lambda d, n, *a, **k: (1.0, "eager"))
    monkeypatch.setattr(bench, "profile_ours", lambda depth, *a, steps, **k: order.append(f"prof-{depth}-{steps}")
                        or ("table", None))
    monkeypatch.setattr(bench, "fp16_images_per_s", lambda depth, *a, **k: order.append(f"fp16-{depth}")
                        or (1.0, 0.01, "eager", None, 0))
    monkeypatch.setattr(bench, "compiled_images_per_s", lambda depth, *a, **k: order.append(f"compile-{depth}")
                        or (1.0, 0.01, 1.0, "eager+compile", None, 0))
    run_bench([1202, 20], device="cpu", seconds=0.1, images=256, out=tmp_path, data=cifar, packs=[1, 2],
              checkpointing=True, profile=True, fp16=True, compile=True)
    assert order == ["base-20", "ours-20", "pack-1", "pack-2", "base-1202", "ours-1202", "ckpt-1202",
                     "fp16-20", "compile-20", "fp16-1202", "compile-1202", "prof-20-20", "prof-1202-3"]
    header = [c.strip() for c in next(tmp_path.glob("*.md")).read_text().splitlines()[2].split("|")]
    assert header.index("ckpt_step_ms") < header.index("gpu_busy")  # the deep row's numbers before the texts


def test_the_bench_times_a_compiled_step_beside_ours(cifar, tmp_path, monkeypatch):
    """--compile: its own columns (here torch.compile stood in for by the model itself: the plumbing, not inductor)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    res = run_bench([8], device="cpu", seconds=0.2, batch_size=16, num_workers=0, images=256, out=tmp_path,
                    data=cifar, packs=[], compile=True, tag="compile")
    assert all(p.endswith(("-compile.json", "-compile.md")) for p in res["paths"])  # an earlier bench file stays
    with pytest.raises(ValueError, match="--tag 'a/b' is not valid"):
        run_bench([8], device="cpu", out=tmp_path, data=cifar, tag="a/b")
    row = res["rows"][0]
    assert row["compiled_img_s"] > 0 and row["compile_s"] > 0 and row["compiled_mode"] == "eager+compile"
    assert row["compiled_graphs"] == 0  # the stand-in compiles nothing: dynamo never ran
    assert row["compile_gain"] == pytest.approx(row["compiled_img_s"] / row["ours_img_s"])
    assert row["compiled_speedup"] == pytest.approx(row["compiled_img_s"] / row["baseline_img_s"])
    assert "CUDA device" in row["compiled_mode_reason"]
    md = (tmp_path / res["paths"][1].split("/")[-1]).read_text()
    assert md.index("compiled_img_s") < min(md.index("ours_mode_reason"), md.index("compiled_mode_reason"))


def test_the_bench_times_an_fp16_step_beside_ours(cifar, tmp_path, monkeypatch):
    """--fp16: our step in loss-scaled fp16, its own columns; it does train in fp16 (its Stepper's scaler)."""
    import resnet_lab.bench as bench

    made = []
    real = bench._ours
    monkeypatch.setattr(bench, "_ours", lambda *a, **k: made.append(k.get("precision", "auto")) or real(*a, **k))
    res = run_bench([8], device="cpu", seconds=0.2, batch_size=16, num_workers=0, images=256, out=tmp_path,
                    data=cifar, packs=[], fp16=True)
    row = res["rows"][0]
    assert made == ["auto", "fp16"]
    assert row["fp16_img_s"] > 0 and row["fp16_mode"] == "eager" and row["fp16_skipped_steps"] == 0
    assert row["fp16_gain"] == pytest.approx(row["fp16_img_s"] / row["ours_img_s"])
    assert row["fp16_speedup"] == pytest.approx(row["fp16_img_s"] / row["baseline_img_s"])
    assert row["fp16_schedule_min"] > 0 and "CUDA device" in row["fp16_mode_reason"]


def test_the_baseline_refuses_a_batch_larger_than_its_images():
    """drop_last leaves the DataLoader empty, and the timing loop would wait for a batch for ever."""
    import torch

    from resnet_lab import bench

    with pytest.raises(ValueError, match="batch_size=128 is more than the 10 images"):
        bench.baseline_images_per_s(8, torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(10, dtype=torch.long),
                                    torch.device("cpu"), 128, 0.1, 0)
