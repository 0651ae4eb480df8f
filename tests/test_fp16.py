"""precision="fp16": autocast with a dynamic loss scale kept on the device (fast.LossScaler)."""
import pytest
import torch

import resnet_lab.fast as fast
from resnet_lab.config import make_config
from resnet_lab.fast import LossScaler, Stepper, make_optimizer, to_device
from resnet_lab.models import build_model
from resnet_lab.train import group_key, train, train_step

from .conftest import needs_data


def _net(seed: int = 0):
    torch.manual_seed(seed)
    model = to_device(build_model("resnet", 8), "cpu")
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    return model, opt, lr_t


def _batch(n: int = 8, seed: int = 1):
    """Batch 8: fp16 convolutions' backward is ~100x slower than fp32's on some CPUs, and cost grows with n."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off_then_grows():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-4, fused=True)
    fast.zero_momentum(opt)
    sc = LossScaler(torch.device("cpu"), init_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    sc.step(opt)
    assert torch.equal(p.detach(), torch.ones(4)) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(4))
    assert torch.isfinite(p.grad[[0, 2, 3]]).all()
    assert float(sc.scale) == 4.0 and float(sc.skipped) == 1
    for _ in range(2):  # growth_interval clean steps: the scale doubles
        p.grad = torch.full((4,), 4.0)  # scaled by 4: unscaled to 1
        sc.step(opt)
    assert float(sc.scale) == 8.0 and float(sc.skipped) == 1
    g1 = 1 + 1e-4  # the unscaled gradient (1) plus weight decay, at p = 1
    g2 = 1 + 1e-4 * (1 - 0.1 * g1)  # ... at p after the first update
    assert torch.allclose(opt.state[p]["momentum_buffer"], torch.full((4,), 0.9 * g1 + g2), rtol=1e-6)
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.1 * g1 - 0.1 * (0.9 * g1 + g2)), rtol=1e-6)


def test_the_loss_scale_does_not_change_the_fp16_step(monkeypatch):
    """The scale comes off again before the update: the scaled step updates like the unscaled fp16 step (to
    0.02% here: the unscaled one loses its smallest gradients to fp16's range, the reason for the scale) and
    both within fp16's rounding of the fp32 step."""
    monkeypatch.setattr(fast, "LOSS_SCALE_INIT", 2.0 ** 14)  # ResNet-8 on this batch overflows from 2^17
    x, y = _batch()
    updates, losses = {}, {}
    for name in ("fp32", "fp16", "scaled"):
        model, opt, lr_t = _net()
        p0 = _flat(model)
        if name == "scaled":
            st = Stepper(model, opt, lr_t, precision="fp16")
            loss, _ = st(x, y, 0.1)
            assert st.scaler is not None and float(st.scaler.skipped) == 0
        else:
            loss, _ = train_step(model, opt, x, y, precision=name)  # no loss scale
        updates[name], losses[name] = _flat(model) - p0, float(loss)
    ref = updates["fp32"].norm()
    assert losses["scaled"] == pytest.approx(losses["fp16"], rel=1e-6)
    assert float((updates["scaled"] - updates["fp16"]).norm() / ref) < 0.002
    # and it did run in fp16 (1.2% off the fp32 step here)
    assert 1e-4 < float((updates["scaled"] - updates["fp32"]).norm() / ref) < 0.05


def test_an_fp16_stepper_starts_with_zero_momentum_and_survives_a_skipped_first_step(monkeypatch):
    """The fused kernel leaves a fresh buffer uninitialised when it skips the step that would fill it."""
    monkeypatch.setattr(fast, "LOSS_SCALE_INIT", 2.0 ** 19)  # fp16 gradients overflow at first
    model, opt, lr_t = _net()
    st = Stepper(model, opt, lr_t, precision="fp16")
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in bufs)
    p0 = _flat(model)
    st(*_batch(), 0.1)
    assert float(st.scaler.skipped) == 1 and float(st.scaler.scale) == 2.0 ** 18
    assert torch.equal(_flat(model), p0)  # skipped: nothing moved
    for _ in range(4):  # ResNet-8, this batch: 3 skipped at 2^19..2^17, then taken
        st(*_batch(), 0.1)
    assert float(st.scaler.skipped) < 5 and torch.isfinite(_flat(model)).all() and not torch.equal(_flat(model), p0)
    assert all(torch.isfinite(opt.state[p]["momentum_buffer"]).all() for p in model.parameters())


def test_a_snapshot_restores_the_loss_scale():
    """Capture's warm-up and the compile check step from a snapshot and put it back: the scale included."""
    monkeypatch_scale = 2.0 ** 40
    model, opt, lr_t = _net()
    st = Stepper(model, opt, lr_t, precision="fp16")
    st.scaler.scale.fill_(monkeypatch_scale)
    snap = st._snapshot()
    st(*_batch(), 0.1)
    assert float(st.scaler.scale) != monkeypatch_scale
    st._restore(snap)
    assert float(st.scaler.scale) == monkeypatch_scale and float(st.scaler.skipped) == 0


def test_the_self_check_steps_both_ways_at_the_scale_it_reports(monkeypatch):
    """Both steps overflow at 2^18 (ResNet-8 on this batch overflows from 2^17 up): the check halves the scale until
    neither does, and each round's two steps (the reference and the checked one) run at that round's scale, the
    one the check reports."""
    monkeypatch.setattr(fast, "LOSS_SCALE_INIT", 2.0 ** 18)
    model, opt, lr_t = _net()
    st = Stepper(model, opt, lr_t, precision="fp16")
    x, y = _batch()
    seen = []

    def one(tag):
        def fn():
            seen.append((tag, float(st.scaler.scale)))
            return st._body(x, y)[0]
        return fn

    check = st._agree(one("reference"), one("other"), st._snapshot(), "other")
    pairs = list(zip(seen[::2], seen[1::2]))
    assert len(pairs) > 1 and all(a[0] == "reference" and b[0] == "other" and a[1] == b[1] for a, b in pairs)
    assert [a[1] for a, _ in pairs] == [2.0 ** (18 - i) for i in range(len(pairs))]
    assert check["loss_scale"] == pairs[-1][0][1] and not check["skipped"] and check["update_rel_diff"] == 0
    assert float(st.scaler.scale) == 2.0 ** 18  # the run's own scale is put back


def test_fp16_runs_are_never_grouped():
    cfg = make_config("smoke", arch="resnet", depth=8, precision="fp16")
    assert group_key(cfg) is None and group_key(make_config("smoke", arch="resnet", depth=8)) is not None
    from resnet_lab.grouped import GroupedNets

    nets = [build_model("resnet", 8) for _ in range(2)]
    model = to_device(GroupedNets(nets), "cpu")
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    with pytest.raises(ValueError, match="precision 'fp16' cannot train grouped runs"):
        Stepper(model, opt, lr_t, precision="fp16", members=2)


def test_precision_names_fp16_among_the_choices():
    with pytest.raises(ValueError, match=r"precision='fp8'.*'fp16'"):
        make_config("smoke", arch="resnet", depth=8, precision="fp8")


@needs_data
def test_an_fp16_run_resumes_exactly_with_its_loss_scale(cifar, tmp_path, monkeypatch):
    """The scale moves during the run (it starts too high, backs off, grows every 2 clean steps); a resume
    that started the scale afresh would skip other steps and learn something else."""
    monkeypatch.setattr(fast, "LOSS_SCALE_INIT", 2.0 ** 19)
    monkeypatch.setattr(fast, "LOSS_SCALE_GROWTH_INTERVAL", 2)
    cfg = make_config("smoke", arch="resnet", depth=8, iterations=10, eval_every=2, batch_size=8, train_subset=256,
                      eval_subset=64, milestones=(8,), precision="fp16")
    straight = train(cfg, root=tmp_path / "a", data=cifar, device="cpu")
    assert straight.status == "done" and straight.summary["compute_dtype"] == "fp16"
    assert straight.summary["fp16_skipped_steps"] >= 1  # the scale did move
    part = train(cfg, root=tmp_path / "b", data=cifar, device="cpu", stop_after=5)
    ck = torch.load(part.path / "checkpoint.pt", weights_only=True)
    assert set(ck["loss_scale"]) == {"scale", "growth_tracker", "skipped"}
    assert part.summary["loss_scale"] == float(ck["loss_scale"]["scale"])  # a sitting cut off says it too
    assert part.summary["fp16_skipped_steps"] == int(ck["loss_scale"]["skipped"])
    resumed = train(cfg, root=tmp_path / "b", data=cifar, device="cpu")
    cols = ["step", "train_loss", "train_err", "test_loss", "test_err"]
    assert resumed.metrics[cols].equals(straight.metrics[cols])
    for k in ("loss_scale", "fp16_skipped_steps"):
        assert resumed.summary[k] == straight.summary[k]


@needs_data
def test_a_checkpoint_with_a_bad_loss_scale_is_set_aside_not_fatal(cifar, tmp_path, caplog):
    cfg = make_config("smoke", arch="resnet", depth=8, iterations=4, eval_every=2, batch_size=8, train_subset=256,
                      eval_subset=64, milestones=(3,), precision="fp16")
    part = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=2)
    ck = torch.load(part.path / "checkpoint.pt", weights_only=True)
    ck["loss_scale"] = {"scale": torch.ones(2)}
    torch.save(ck, part.path / "checkpoint.pt")
    (part.path / "checkpoint.prev.pt").unlink(missing_ok=True)
    rec = train(cfg, root=tmp_path, data=cifar, device="cpu")
    assert rec.status == "done" and "loss_scale is not" in caplog.text
    assert list(part.path.glob("checkpoint.pt.bad-*"))
