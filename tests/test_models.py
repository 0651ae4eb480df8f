import pytest
import torch

from resnet_lab.analysis import count_macs
from resnet_lab.models import build_model, count_params

# He et al. 2015 Table 6 nets with option-A shortcuts (exact counts).
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth, params", PARAMS.items())
def test_parameter_counts_match_the_paper(depth, params):
    assert count_params(build_model("resnet", depth)) == params
    assert count_params(build_model("plain", depth)) == params  # option A adds no parameters


def test_resnet_1202_has_19_4M_parameters():
    assert round(count_params(build_model("resnet", 1202)) / 1e6, 1) == 19.4


def test_forward_shapes_and_block_list():
    m = build_model("resnet", 20)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(m.blocks) == 9 and [b.changes_shape for b in m.blocks].count(True) == 2
    assert len(build_model("plain", 56).blocks) == 27


def test_macs_match_the_papers_flops():
    # ResNet-20 ~ 41M, ResNet-56 ~ 125M multiply-adds per 32x32 image
    assert abs(count_macs(build_model("resnet", 20)) / 40.55e6 - 1) < 0.01
    assert abs(count_macs(build_model("resnet", 56)) / 125.5e6 - 1) < 0.01


@pytest.mark.parametrize("kw, pattern", [
    (dict(depth=22), "depth=22 is not valid.*6n\\+2"),
    (dict(arch="vgg"), "arch='vgg'.*plain"),
    (dict(shortcut="Z"), "shortcut='Z'"),
])
def test_bad_model_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(**kw)


def test_init_is_seeded():
    torch.manual_seed(0)
    a = build_model("resnet", 8)
    torch.manual_seed(0)
    b = build_model("resnet", 8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

