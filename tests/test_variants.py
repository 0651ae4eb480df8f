"""Shortcut ablations, bottlenecks, pre-activation, highway and gated blocks (issue: shortcut ablations)."""
import pytest
import torch
from torch import nn

from resnet_lab.config import RunConfig, make_config
from resnet_lab.models import build_model, count_params


def n_convs3x3(m):
    return sum(1 for x in m.modules() if isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3))


def test_option_b_adds_projections_at_the_two_transitions():
    extra = count_params(build_model("resnet", 20, shortcut="B")) - count_params(build_model("resnet", 20))
    # 1x1 conv + BN (weight, bias): 16->32 and 32->64
    assert extra == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_c_projects_on_every_block():
    m = build_model("resnet", 20, shortcut="C")
    extra = count_params(m) - count_params(build_model("resnet", 20))
    per_stage = [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)] + [(64, 64)] * 2
    assert extra == sum(cin * cout + 2 * cout for cin, cout in per_stage)


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("k", [1, 3])
def test_skip_k_keeps_the_conv_count(depth, k):
    ref = build_model("resnet", depth)
    m = build_model("resnet", depth, block_layers=k)
    assert n_convs3x3(m) == n_convs3x3(ref) == depth - 1
    assert len(m.blocks) == 3 * (depth - 2) // 3 // k
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_block_layers_names_depths_that_work():
    with pytest.raises(ValueError, match="block_layers=3.*depths that work: 20, 38, 56"):
        build_model("resnet", 14, block_layers=3)
    with pytest.raises(ValueError, match="block_layers=4.*\\[1, 2, 3\\]"):
        build_model("resnet", 20, block_layers=4)


@pytest.mark.parametrize("arch", ["preact", "highway", "gated"])
def test_preact_and_gated_shapes(arch):
    m = build_model(arch, 20)
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 10) and len(m.blocks) == 9


def test_bottleneck_depth_and_shapes():
    m = build_model("resnet", 29, bottleneck=True)
    assert len(m.blocks) == 9 and m.head[-1].in_features == 256
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="9n\\+2"):
        build_model("resnet", 32, bottleneck=True)


def test_bottleneck_variant_projects_where_the_shape_changes():
    """The first bottleneck block widens 16 -> 64 channels: a projection there, not 48 zero channels."""
    from resnet_lab.experiments import ablation_configs
    from resnet_lab.models import model_from_config

    cfg, = ablation_configs("smoke", ["bottleneck"], [20], [0])
    m = model_from_config(cfg)
    convs = [[isinstance(x, torch.nn.Conv2d) for x in b.shortcut.modules()] for b in m.blocks]
    assert [any(c) for c in convs] == [b.changes_shape for b in m.blocks] == [True, False, True, False, True, False]


def test_closed_highway_gate_returns_the_input():
    m = build_model("highway", 20, gate_bias=-40.0).eval()
    block = m.blocks[1]  # same shape in and out
    x = torch.relu(torch.randn(2, 16, 32, 32))  # block inputs come out of a ReLU
    with torch.no_grad():
        assert torch.allclose(block(x), x, atol=1e-6)
        open_gate = build_model("highway", 20, gate_bias=40.0).eval().blocks[1]
        assert not torch.allclose(open_gate(x), x)


def twin_blocks(gate_bias, i=1):
    """Block i of a gated net and of a resnet with the same branch and shortcut weights."""
    torch.manual_seed(0)
    gated = build_model("gated", 20, gate_bias=gate_bias).eval()
    res = build_model("resnet", 20).eval()
    res.load_state_dict({k: v for k, v in gated.state_dict().items() if ".gate." not in k})
    return gated.blocks[i], res.blocks[i]


@pytest.mark.parametrize("i", [1, 3])  # same shape, and a stage transition (option A zero-pad)
def test_shortcut_only_gate_scales_the_shortcut_not_the_branch(i):
    """He et al. 2016: F(x) + (1-g(x))*x. A closed gate (bias -40) is the plain ResNet block; an open one
    (+40) drops the shortcut and keeps the whole branch (a highway block would keep T*F, not F)."""
    x = torch.relu(torch.randn(2, 16, 32, 32))
    closed, res = twin_blocks(-40.0, i)
    opened, _ = twin_blocks(40.0, i)
    with torch.no_grad():
        assert torch.allclose(closed(x), res(x), atol=1e-5)
        res.shortcut = None  # the branch alone, through the block's ReLU
        assert torch.allclose(opened(x), res(x), atol=1e-5)


def test_gated_starts_at_its_papers_bias_and_other_hashes_stay():
    assert RunConfig(arch="gated").gate_bias == -6.0 and make_config("paper", arch="gated").gate_bias == -6.0
    assert RunConfig(arch="highway").gate_bias == -2.0
    assert RunConfig(arch="gated", gate_bias=0).gate_bias == 0.0  # asked for: kept (as a float)
    assert build_model("gated", 20).blocks[0].gate.bias.detach().eq(-6).all()
    # the field gained a per-arch default; runs stored before (gate_bias -2.0 in their config) keep their folder
    for arch in ("resnet", "plain", "preact", "highway"):
        assert RunConfig(arch=arch).hash == RunConfig(arch=arch, gate_bias=-2.0).hash
    # the default config's folder, as the code before the change named it (pad_fill: the runs before it were black)
    assert RunConfig(pad_fill="black").hash == "fcb22df1aed5"
    assert RunConfig.from_json({**RunConfig(arch="gated").to_json(), "gate_bias": float("nan")}).gate_bias == -6.0


def test_a_lesioned_gated_block_keeps_its_gated_shortcut():
    block, _ = twin_blocks(0.0)  # g = 0.5 at the start: the shortcut is halved
    x = torch.relu(torch.randn(2, 16, 32, 32))
    block.lesioned = True
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu((1 - torch.sigmoid(block.gate(x))) * x), atol=1e-6)


@pytest.mark.parametrize("kw", [dict(arch="plain"), dict(shortcut="B"), dict(shortcut="C"), dict(block_layers=1),
                                dict(block_layers=3), dict(arch="preact"), dict(arch="highway"),
                                dict(arch="gated"), dict(bottleneck=True)])
def test_every_variant_takes_a_finite_sgd_step(kw):
    torch.manual_seed(0)
    m = build_model(depth=20, **kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


def test_bad_variant_config_values():
    with pytest.raises(ValueError, match="shortcut='B' means nothing for arch='plain'"):
        make_config("smoke", arch="plain", shortcut="B")
    with pytest.raises(ValueError, match="for bottleneck blocks, which have 3 layers"):
        make_config("smoke", bottleneck=True, block_layers=3)


def test_activation_checkpointing_gives_the_same_loss_gradients_and_bn_statistics():
    torch.manual_seed(0)
    a = build_model("resnet", 14)
    b = build_model("resnet", 14, activation_checkpointing=2)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    la = nn.functional.cross_entropy(a(x), y)
    lb = nn.functional.cross_entropy(b(x), y)
    la.backward()
    lb.backward()  # re-runs each group's forward: BN running stats must still be updated once
    assert torch.allclose(la, lb, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(u, v, atol=1e-6), k


def test_resnet_1202_forward_backward_on_cpu():
    m = build_model("resnet", 1202, activation_checkpointing=2)
    out = m(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10) and m.blocks[0].branch[0].weight.grad is not None


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_preact_activates_before_the_split_where_he_2016_does(shortcut):
    """The first unit after conv1, and every projection shortcut, see BN-ReLU(x), not the raw x."""
    m = build_model("preact", 20, shortcut=shortcut).eval()
    projection = [shortcut == "C" or (shortcut == "B" and b.changes_shape) for b in m.blocks]
    shared = [b.pre is not None for b in m.blocks]
    assert shared == [i == 0 or p for i, p in enumerate(projection)]
    for b in m.blocks:  # a branch never activates twice, and always starts with BN-ReLU when not shared
        first = b.branch[0]
        assert isinstance(first, nn.Conv2d) if b.pre is not None else isinstance(first, nn.BatchNorm2d)
    if shortcut == "A":  # BNs see unit inputs: no stem BN (-32), a head BN (+128), narrower BNs at
        assert count_params(m) == 269_722  # the two transitions (-32, -64): ResNet-20's count again
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = m.stem(x)
        m.blocks[0].lesioned = True  # the skip path of the first unit carries the activation
        skip = m.blocks[0](stem)
        assert stem.min() < 0
        if not projection[0]:
            assert torch.equal(skip, m.blocks[0].pre(stem)) and skip.min() >= 0


@pytest.mark.parametrize("shortcut", ["B", "C"])
def test_a_deleted_post_activation_block_keeps_its_relu(shortcut):
    m = build_model("resnet", 20, shortcut=shortcut).eval()
    block = m.blocks[3]  # 16 -> 32 with a projection shortcut
    x = torch.relu(torch.randn(2, 16, 32, 32))
    with torch.no_grad():
        block.lesioned = True
        out = block(x)
        assert torch.equal(out, torch.relu(block.shortcut(x))) and out.min() >= 0


def test_a_model_revision_moves_only_its_arch_to_new_folders():
    from resnet_lab.config import MODEL_REVISIONS, RunConfig

    assert make_config("quick", arch="resnet", depth=20).result_fields().get("model_revision") is None
    pre = make_config("quick", arch="preact", depth=20)
    assert pre.result_fields()["model_revision"] == MODEL_REVISIONS["preact"]
    assert RunConfig.from_json(pre.to_json()) == pre  # config.json is not touched by it


@pytest.mark.parametrize("arch,depth", [("gated", 56), ("highway", 56), ("gated", 110)])
def test_every_gate_starts_open_at_exactly_sigmoid_of_its_bias(arch, depth):
    """He et al. 2016 rest shortcut-only gating on 1 - g ~ 1 at b = -6: whatever the block's input (it grows
    with depth), each gate starts at sigmoid(b), so the identity path through all blocks is barely damped."""
    import math

    torch.manual_seed(0)
    m = build_model(arch, depth).train()
    opens = []
    hooks = [b.gate.register_forward_hook(lambda mod, i, o: opens.append(torch.sigmoid(o))) for b in m.blocks]
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))
    for h in hooks:
        h.remove()
    bias = m.blocks[0].gate.bias[0].item()
    assert len(opens) == len(m.blocks)
    assert all(torch.allclose(g, torch.full_like(g, 1 / (1 + math.exp(-bias)))) for g in opens)
    if arch == "gated":
        assert math.prod(1 - g.mean().item() for g in opens) > 0.8


def test_a_gate_learns_from_zero_weights():
    torch.manual_seed(0)
    m = build_model("gated", 20)
    torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(b.gate.weight.grad.abs().sum() > 0 for b in m.blocks)


def test_a_bottleneck_strides_on_its_first_1x1_as_he_2016_code():
    m = build_model("preact", 164, shortcut="B", bottleneck=True)
    first_of_stage2 = m.blocks[18]
    convs = [c for c in first_of_stage2.branch if isinstance(c, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_gate_and_bottleneck_revisions_move_only_their_runs():
    from resnet_lab.config import BOTTLENECK_REVISION, MODEL_REVISIONS

    for arch in ("gated", "highway"):
        assert make_config("quick", arch=arch, depth=20).result_fields()["model_revision"] == MODEL_REVISIONS[arch] >= 2
    assert "bottleneck_revision" not in make_config("quick", arch="preact", depth=20).result_fields()
    assert make_config("quick", arch="preact", depth=164, bottleneck=True,
                       shortcut="B").result_fields()["bottleneck_revision"] == BOTTLENECK_REVISION
