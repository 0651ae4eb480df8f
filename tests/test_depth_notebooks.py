"""Layer-response hooks, ImageNet architecture counts and grid validation (issue: depth notebooks)."""
import pytest
import torch

from resnet_lab import experiments as ex
from resnet_lab.analysis import imagenet_model, imagenet_table, layer_responses, response_layers
from resnet_lab.data import eval_batches
from resnet_lab.models import build_model


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_response_hooks_capture_every_3x3_layer_and_change_nothing(arch):
    torch.manual_seed(0)
    m = build_model(arch, 20, shortcut="A").eval()
    layers = response_layers(m)
    assert len(layers) == 19  # the first conv + 18 in the blocks; every one a BN right after a 3x3 conv
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        before = m(x.float())
    df = layer_responses(m, eval_batches(x, y, 8))
    with torch.no_grad():
        after = m(x.float())
    assert torch.equal(before, after) and not m.training
    assert list(df["layer"]) == list(range(1, 20)) and (df["std"] > 0).all()
    assert list(df["channels"]) == [16] * 7 + [32] * 6 + [64] * 6
    assert sorted(df["rank"]) == list(range(1, 20))


def test_response_std_is_the_per_channel_std_averaged():
    m = build_model("resnet", 8).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    grabbed = []
    h = response_layers(m)[0].register_forward_hook(lambda _m, _i, o: grabbed.append(o.detach().clone()))  # clone: an in-place ReLU follows
    df = layer_responses(m, eval_batches(x, torch.zeros(6, dtype=torch.long), 6))
    h.remove()
    ref = grabbed[0].double().transpose(0, 1).reshape(16, -1).std(dim=1, unbiased=False).mean()
    assert abs(df["std"].iloc[0] - float(ref)) < 1e-9


def test_response_std_uses_exactly_max_images_when_the_last_batch_overshoots():
    torch.manual_seed(0)
    m = build_model("resnet", 8).eval()
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(12, dtype=torch.long)
    capped = layer_responses(m, eval_batches(x, y, 8), max_images=5)  # one batch of 8, of which 5 count
    exact = layer_responses(m, eval_batches(x[:5], y[:5], 5))
    assert capped["std"].tolist() == pytest.approx(exact["std"].tolist(), rel=1e-12)
    assert layer_responses(m, eval_batches(x, y, 4), max_images=12)["std"].tolist() == pytest.approx(
        layer_responses(m, eval_batches(x, y, 12))["std"].tolist(), rel=1e-12)


def test_projection_shortcut_bns_are_not_responses():
    assert len(response_layers(build_model("resnet", 20, shortcut="C"))) == 19


def test_imagenet_counts_match_the_published_numbers():
    t = imagenet_table([18, 34, 50]).set_index("depth")
    published_params_m = {18: 11.7, 34: 21.8, 50: 25.6}
    for d, p in published_params_m.items():
        assert abs(t.loc[d, "params_M"] / p - 1) < 0.02
        assert abs(t.loc[d, "GMACs (paper, stride on 1x1)"] / t.loc[d, "GMACs (He et al. Table 1, as reported)"] - 1) < 0.02
    assert t.loc[50, "GMACs (torchvision, stride on 3x3)"] > t.loc[50, "GMACs (paper, stride on 1x1)"]
    with pytest.raises(ValueError, match="depth=42.*18, 34, 50, 101, 152"):
        imagenet_model(42)


@pytest.mark.parametrize("call, pattern", [
    (lambda: ex.depth_configs("quick", [], [0]), "depths=\\[\\] is not valid"),
    (lambda: ex.depth_configs("quick", [21], [0]), "depth=21.*6n\\+2"),
    (lambda: ex.depth_configs("quick", [20], [-1]), "seeds contains -1"),
    (lambda: ex.depth_configs("fast", [20], [0]), "preset='fast'.*paper"),
    (lambda: ex.ablation_configs("quick", ["D"], [20], [0]), "variants contains 'D'.*'plain'"),
    (lambda: ex.thousand_layer_configs("quick", [1201], [0]), "depth=1201"),
    (lambda: ex.unravel_configs("quick", 20, [0], arch="plain"), "arch contains 'plain'"),
])
def test_grid_errors_come_before_any_training(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_pre_activation_nets_are_refused_not_half_measured():
    """A preact branch still has conv -> BN pairs (conv1 -> BN of the next unit): 9 of 19 layers matched silently."""
    m = build_model("preact", 20).eval()
    with pytest.raises(ValueError, match="arch='preact'.*'plain', 'resnet'"):
        response_layers(m)
    with pytest.raises(ValueError, match="arch='preact'"):
        layer_responses(m, eval_batches(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 2))
