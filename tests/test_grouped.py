"""N nets grouped into one (conv groups) compute and learn exactly what the N nets do on their own.

In float64: a grouped conv sums in another order than N separate convs, and in float32 that
reordering alone moves a deep net's stem gradient by ~1e-4 on some CPUs (seen on an AMD EPYC);
in float64 it is ~1e-16, so a tight tolerance still catches any real mixing of members."""
import pytest
import torch
import torch.nn.functional as F

from resnet_lab.fast import make_optimizer
from resnet_lab.grouped import GroupedNets
from resnet_lab.models import build_model

N, B = 3, 4
VARIANTS = [dict(arch="resnet"), dict(arch="plain"), dict(arch="resnet", shortcut="B"),
            dict(arch="resnet", shortcut="C"), dict(arch="preact"), dict(arch="highway"),
            dict(arch="gated"), dict(arch="resnet", block_layers=1), dict(arch="resnet", depth=11, bottleneck=True)]


def members(**kw):
    out = []
    for seed in range(N):
        torch.manual_seed(seed)
        out.append(build_model(**{"depth": 8, **kw}).double())
    return out


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N * B, 3, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (N * B,), generator=g)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_grouped_step_equals_each_net_stepping_alone(kw):
    nets = members(**kw)
    group = GroupedNets(nets)
    for i, m in enumerate(nets):  # grouping copies: the members start where the nets are
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in group.member_state_dict(i).items())
    x, y = data()
    opt_g, _ = make_optimizer(group, 0.1, 0.9, 1e-4)
    out = group(x)
    F.cross_entropy(out, y).backward()
    opt_g.step()
    for i, m in enumerate(nets):
        xi, yi = x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]
        opt, _ = make_optimizer(m, 0.1, 0.9, 1e-4)
        oi = m(xi)
        assert torch.allclose(out[i * B:(i + 1) * B], oi, atol=1e-9)
        F.cross_entropy(oi, yi).backward()
        opt.step()
        got = group.member_state_dict(i)
        for k, v in m.state_dict().items():  # weights after the step, BN running statistics
            assert torch.allclose(got[k].double(), v.double(), atol=1e-9), (kw, i, k)
    group.eval()
    for m in nets:
        m.eval()
    out = group(x)
    for i, m in enumerate(nets):
        assert torch.allclose(out[i * B:(i + 1) * B], m(x[i * B:(i + 1) * B]), atol=1e-9)


def test_member_weights_load_into_a_plain_model():
    group = GroupedNets(members())
    m = build_model("resnet", 8)
    m.load_state_dict(group.member_state_dict(2))  # strict: same keys and shapes
    with pytest.raises(ValueError, match=r"member=3 is not valid: use 0\.\.2"):
        group.member_state_dict(3)


def test_nets_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match="differs from model 0"):
        GroupedNets([build_model("resnet", 8), build_model("resnet", 14)])
    # same shapes, other computations: every member would run model 0's code (a gate on the shortcut only,
    # or no shortcut at all)
    for other in ("gated", "plain"):
        with pytest.raises(ValueError, match=rf"model 1 differs from model 0 in the net \(CifarResNet: arch "
                                             rf"'{other}', not '(highway|resnet)'"):
            GroupedNets([build_model("highway" if other == "gated" else "resnet", 8), build_model(other, 8)])
    GroupedNets([build_model("highway", 8), build_model("highway", 8)])  # seeds of one net still group
    lesioned = build_model("resnet", 8)  # a flag, not a string, sets what a block computes
    lesioned.blocks[1].lesioned = True
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 in blocks\.1 \(Block: lesioned True, not False\)"):
        GroupedNets([build_model("resnet", 8), lesioned])
    with pytest.raises(ValueError, match="cannot group a Dropout"):
        GroupedNets([torch.nn.Sequential(torch.nn.Dropout())])


def test_group_switch_reads_the_environment(monkeypatch):
    from resnet_lab.experiments import group_seeds
    from resnet_lab.train import group_key
    from resnet_lab.config import make_config

    monkeypatch.delenv("RESNET_LAB_GROUP", raising=False)
    assert group_seeds() is False
    monkeypatch.setenv("RESNET_LAB_GROUP", "1")
    assert group_seeds() is True
    monkeypatch.setenv("RESNET_LAB_GROUP", "yes")
    with pytest.raises(ValueError, match=r"RESNET_LAB_GROUP='yes' is not valid: use 0 or 1"):
        group_seeds()
    a, b = make_config("smoke", seed=0), make_config("smoke", seed=1)
    assert group_key(a) == group_key(b) != group_key(make_config("smoke", depth=14))
    assert group_key(make_config("smoke", depth=110, warmup_lr=0.01)) is None  # warm-ups end at their own step


def test_grouping_draws_nothing_from_the_random_generator():
    """Its convolutions take the members' weights, so a random init would only advance the generator
    (on a GPU, the CUDA one: which fails while a graph capture is under way on the stream)."""
    nets = members()
    state = torch.get_rng_state()
    GroupedNets(nets)
    assert torch.equal(torch.get_rng_state(), state)
