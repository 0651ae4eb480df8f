"""The CUDA fast path on a real GPU: captured, agreeing with the eager step, packed runs on streams.

Skipped without CUDA (CI has none); run first in a GPU session, before any benchmark or paper run:
    RESNET_LAB_DATA=.data/cifar10-jpeg.tar.gz python3 -m pytest -q tests/test_gpu.py
"""
import pytest
import torch

from resnet_lab.config import make_config
from resnet_lab.fast import Stepper, make_optimizer, to_device
from resnet_lab.models import build_model

from .conftest import needs_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LRS = [0.1] * 4 + [0.01] * 4


@pytest.fixture(autouse=True)
def own_capture_flag(monkeypatch):
    """Each test starts with graphs allowed: one failed capture turns the rest of a process eager, which
    would fail every later test here for the first one's reason."""
    from resnet_lab import fast

    monkeypatch.setattr(fast, "_capture_failed", None)


def run_steps(model, fast, batches):
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    st = Stepper(model, opt, lr_t, "auto", fast=fast)
    losses = [float(st(x, y, lr)[0]) for (x, y), lr in zip(batches, LRS)]
    return st, losses


def twins(arch="resnet", depth=20, **kw):
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    a = to_device(build_model(arch, depth, **kw), cuda)
    b = to_device(build_model(arch, depth, **kw), cuda)
    b.load_state_dict(a.state_dict())
    return a, b


def batches(n=len(LRS), b=128):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g).cuda(),
             torch.randint(0, 10, (b,), generator=g).cuda()) for _ in range(n)]


@pytest.mark.parametrize("arch, depth, kw", [
    ("resnet", 20, {}), ("plain", 20, {}), ("preact", 20, {}), ("highway", 20, {}), ("gated", 20, {}),
    ("resnet", 20, {"shortcut": "C"}), ("resnet", 56, {"activation_checkpointing": 2}),
])
def test_graph_is_captured_and_trains_like_the_eager_step(arch, depth, kw):
    a, b = twins(arch, depth, **kw)
    data = batches()
    st, la = run_steps(a, True, data)
    _, lb = run_steps(b, False, data)
    assert st.mode == "graph", st.reason
    assert st.check["loss_rel_diff"] < 1e-2 and st.check["update_rel_diff"] < 0.1
    assert la == pytest.approx(lb, rel=2e-2)  # bf16: same kernels, non-deterministic reductions
    pa = torch.cat([p.detach().flatten() for p in a.parameters()])
    pb = torch.cat([p.detach().flatten() for p in b.parameters()])
    assert float((pa - pb).norm() / pb.norm()) < 1e-2


@pytest.mark.parametrize("depth, kw", [(20, {}), (56, {"activation_checkpointing": 2})])
def test_a_compiled_forward_is_captured_and_trains_like_the_plain_step(depth, kw):
    """torch.compile (inductor, Triton) on each block inside our captured step: compiled, captured, and
    learning what the plain eager step learns, also with the blocks recomputed in the backward pass
    (checkpointing); run before `bench --compile` times it."""
    a, b = twins("resnet", depth, **kw)
    data = batches()
    opt, lr_t = make_optimizer(a, 0.1, 0.9, 1e-4)
    st = Stepper(a, opt, lr_t, "auto", compile=True)
    la = [float(st(x, y, lr)[0]) for (x, y), lr in zip(data, LRS)]
    assert st.label == "graph+compile", (st.compile_reason, st.reason)
    assert st.compile_check["update_rel_diff"] < 0.1 and st.compile_check["bn_stats_rel_diff"] < 0.1
    _, lb = run_steps(b, False, data)
    assert la == pytest.approx(lb, rel=5e-2)  # bf16, other (fused) kernels
    pa = torch.cat([p.detach().flatten() for p in a.parameters()])
    pb = torch.cat([p.detach().flatten() for p in b.parameters()])
    assert float((pa - pb).norm() / pb.norm()) < 2e-2


def flat_grads(model):
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters()])


def test_an_fp16_step_is_captured_with_its_loss_scale_and_trains_like_the_eager_one(monkeypatch):
    """precision="fp16": the loss scale's check, skip and update replay inside the graph (growing every 2
    clean steps, the scale moves on replays), and graph and eager make the same updates."""
    from resnet_lab import fast

    monkeypatch.setattr(fast, "LOSS_SCALE_GROWTH_INTERVAL", 2)
    a, b = twins()
    data = batches()
    p0 = torch.cat([p.detach().flatten() for p in a.parameters()])
    out = {}
    for model, graph in ((a, True), (b, False)):
        opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
        st = Stepper(model, opt, lr_t, "fp16", fast=graph)
        trail = [(float(st(x, y, lr)[0]), float(st.scaler.scale)) for (x, y), lr in zip(data, LRS)]
        out[graph] = st, trail
    st, trail = out[True]
    assert st.mode == "graph", st.reason
    assert not st.check["skipped"] and float(st.scaler.skipped) <= 2
    scales = [s for _, s in trail]
    assert any(s2 == 2 * s1 for s1, s2 in zip(scales, scales[1:])), scales  # grew on a replay
    assert scales == [s for _, s in out[False][1]]  # the same skips and growth as the eager step
    assert [l for l, _ in trail] == pytest.approx([l for l, _ in out[False][1]], rel=1e-2)
    ua = torch.cat([p.detach().flatten() for p in a.parameters()]) - p0
    ub = torch.cat([p.detach().flatten() for p in b.parameters()]) - p0
    assert float((ua - ub).norm() / ub.norm()) < 5e-2  # the updates themselves, not the weights


def test_grad_shows_each_replayed_step():
    """After capture and its self-check, `.grad` is the graph's gradient, not the self-check's stale one."""
    a, b = twins()
    data = batches()
    grads = []
    opt, lr_t = make_optimizer(a, 0.1, 0.9, 1e-4)
    st = Stepper(a, opt, lr_t, "auto")
    for (x, y), lr in zip(data, LRS):
        st(x, y, lr)
        grads.append(flat_grads(a).clone())
    assert st.mode == "graph", st.reason
    assert all(not torch.equal(g, h) for g, h in zip(grads, grads[1:]))
    run_steps(b, False, data)
    last = flat_grads(b)
    assert float((grads[-1] - last).norm() / last.norm()) < 0.5  # a stale first-step gradient is ~1.0 away


@needs_data
def test_packed_runs_on_streams_learn_what_lone_runs_learn(cifar, tmp_path):
    from resnet_lab.train import train, train_many

    # nets of two depths, as the degradation grid packs them (20 and 56 layers of one seed); on the CPU both
    # move in 60 steps (plain-20's loss 2.28 -> 1.94, ResNet-56's 4.0 -> 2.30; a plain-56 stays at chance)
    cfgs = [make_config("smoke", arch=a, depth=d, iterations=60, eval_every=20, milestones=(40,),
                        batch_size=128, train_subset=2560, eval_subset=500) for a, d in (("plain", 20), ("resnet", 56))]
    alone = [train(c, root=tmp_path / "a", data=cifar, device="cuda") for c in cfgs]
    packed = train_many(cfgs, root=tmp_path / "b", data=cifar, device="cuda", pack=2)
    for a, p in zip(alone, packed):
        assert p.status == "done" and p.summary["step_mode"] == "graph" and p.summary["packed_runs"] == 2
        assert a.summary["step_mode"] == "graph"
        assert abs(p.summary["final_train_loss"] - a.summary["final_train_loss"]) < 0.1


def test_grouped_nets_capture_and_match_their_members():
    from resnet_lab.grouped import GroupedNets

    cuda = torch.device("cuda")
    nets = []
    for seed in range(4):
        torch.manual_seed(seed)
        nets.append(to_device(build_model("resnet", 20), cuda))
    group = to_device(GroupedNets(nets), cuda)
    x, y = batches(1, b=4 * 128)[0]
    # without autograd: a graph kept alive from here holds AccumulateGrad nodes made on the default
    # stream, which the captured backward would then join (the capture fails; torch warns of it)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, alone = group(x.float() / 255), [m(x[i * 128:(i + 1) * 128].float() / 255) for i, m in enumerate(nets)]
    assert float((out.float() - torch.cat(alone).float()).abs().max()) < 5e-2  # bf16, other conv kernels
    opt, lr_t = make_optimizer(group, 0.1, 0.9, 1e-4)
    st = Stepper(group, opt, lr_t, "auto", members=4)
    one = batches(1, b=4 * 128)[0]  # the same batch each step: every member's loss must fall as it fits it
    losses = [st(*one, lr)[0].clone() for lr in LRS]
    assert st.mode == "graph", st.reason
    assert losses[0].shape == (4,) and bool((losses[-1] < losses[0]).all())


def test_grouped_nets_compile_capture_and_learn():
    """Compiled blocks of a grouped net (grouped convs) inside the captured step: checked against the plain
    grouped step, captured, and every member's loss falls on a batch it fits."""
    from resnet_lab.grouped import GroupedNets

    cuda = torch.device("cuda")
    nets = []
    for seed in range(2):
        torch.manual_seed(seed)
        nets.append(build_model("resnet", 20))
    group = to_device(GroupedNets(nets), cuda)
    opt, lr_t = make_optimizer(group, 0.1, 0.9, 1e-4)
    st = Stepper(group, opt, lr_t, "auto", members=2, compile=True)
    one = batches(1, b=2 * 128)[0]
    losses = [st(*one, lr)[0].clone() for lr in LRS]
    assert st.label == "graph+compile", (st.compile_reason, st.reason)
    assert st.compile_check["update_rel_diff"] < 0.1 and st.compile_check["bn_stats_rel_diff"] < 0.1
    assert losses[0].shape == (2,) and bool((losses[-1] < losses[0]).all())


@needs_data
def test_grouped_seeds_train_like_lone_runs(cifar, tmp_path):
    from resnet_lab.train import train, train_many

    cfgs = [make_config("smoke", depth=20, iterations=60, eval_every=20, milestones=(40,), batch_size=128,
                        train_subset=2560, eval_subset=500, seed=s) for s in (0, 1)]
    alone = [train(c, root=tmp_path / "a", data=cifar, device="cuda") for c in cfgs]
    grouped = train_many(cfgs, root=tmp_path / "b", data=cifar, device="cuda", pack=2, group=True)
    for a, g in zip(alone, grouped):
        assert g.status == "done" and g.summary["step_mode"] == "graph" and g.summary["grouped_runs"] == 2
        assert abs(g.summary["final_train_loss"] - a.summary["final_train_loss"]) < 0.1


@needs_data
def test_unravel_analysis_runs_on_the_gpu_and_is_cached_for_the_cpu(cifar, tmp_path, monkeypatch):
    """What `resnet-lab analyse` does there: the tables computed on CUDA are read back here without a model."""
    from resnet_lab import experiments as ex
    from resnet_lab.runs import RunDir, load_runs
    from resnet_lab.train import train

    root = tmp_path / "runs"
    for arch in ("resnet", "plain"):
        train(make_config("smoke", arch=arch, depth=20), root=root, data=cifar, device="cuda")
    kw = dict(draws=1, eval_images=500, grad_samples=2, grad_batch=128, root=root)
    gpu = ex.unravel_analysis(load_runs(root), device="cuda", **kw)
    assert len(gpu["lesion"]) == 18 and len(gpu["gradient"]) == 2 * 10 and len(gpu["effective"]) == 1
    monkeypatch.setattr(RunDir, "load_model_and_sha256", lambda *a, **k: pytest.fail("cache not used"))
    cpu = ex.unravel_analysis(load_runs(root), device="cpu", **kw)
    assert all(cpu[k].equals(gpu[k]) for k in gpu)


def test_paths_measured_together_on_the_gpu_have_their_own_gradient_norms():
    """On CUDA gradient_by_path_length measures as many paths a pass as PASS_IMAGES allows (one a pass: 5,500
    launch-bound passes for a 110-layer net); the norms must be those of one pass each."""
    from resnet_lab.fast import exact_fp32
    from resnet_lab.unravel import gradient_by_path_length

    torch.manual_seed(0)
    model = build_model("preact", 20).to("cuda").eval()
    x, y = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (512,))
    kw = dict(ks=[0, 3, 9], samples=20, seed=1, batch=128)
    with exact_fp32():  # as the cached analysis runs it
        together = gradient_by_path_length(model, x, y, **kw)  # 16 samples a pass
        one = gradient_by_path_length(model, x, y, per_pass=1, **kw)
    assert together["blocks"].tolist() == one["blocks"].tolist()
    assert together["grad_norm"].tolist() == pytest.approx(one["grad_norm"].tolist(), rel=1e-3)


FAILED_CAPTURE = """
import torch, pytest
import resnet_lab.fast as fast
from tests.test_gpu import batches, run_steps, twins

real = fast.step_body

def body(*args, **kw):
    if torch.cuda.is_current_stream_capturing():
        torch.ones(1, device="cuda").item()  # a sync, not allowed while capturing: the capture fails
    return real(*args, **kw)

fast.step_body = body
a, b = twins()
data = batches()
mine = torch.cuda.Stream()
mine.wait_stream(torch.cuda.current_stream())  # the nets and batches were made on the default stream
with torch.cuda.stream(mine):
    st, la = run_steps(a, True, data)
    assert torch.cuda.current_stream() == mine
assert st.mode == "eager" and "CUDA graph not used" in st.reason, st.reason
fast.step_body = real
_, lb = run_steps(b, False, data)
assert la == pytest.approx(lb, rel=2e-2)
c, _ = twins()
later, _ = run_steps(c, True, data)  # the process's allocator may be upset: no more captures in it
assert later.mode == "eager" and "an earlier CUDA graph capture in this process failed" in later.reason, later.reason
print("ok")
"""


def test_failed_capture_falls_back_to_eager_on_the_callers_stream():
    """A capture that breaks (here: a sync inside it) leaves the caller's stream current, trains as the eager
    step does, and keeps later steppers in that process eager. In a process of its own: a failed capture
    can upset torch 2.11's caching allocator for the rest of the process."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", FAILED_CAPTURE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)  # well inside the README's `timeout 240` for the whole file
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
