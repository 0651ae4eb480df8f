import pytest

from resnet_lab.config import PRESETS, RunConfig, check_depth, make_config


def test_hash_is_stable_and_ignores_speed_only_fields():
    a = make_config("quick", arch="plain", depth=56)
    b = make_config("quick", arch="plain", depth=56, activation_checkpointing=2, fast=False, compile=True)
    assert a.hash == b.hash and len(a.hash) == 12
    assert a.hash != make_config("quick", arch="plain", depth=56, seed=1).hash
    assert RunConfig.from_json(a.to_json()) == a


# Another valid value of every field that changes what a run learns: each must move the hash, or a run trained
# one way would be handed back for a config asking another (a field added to RunConfig must be added here).
OTHER_VALUE = dict(preset="quick", arch="plain", depth=32, block_layers=1, shortcut="B", width=32, dataset="0123456789abcdef",
                   split="45k5k", train_subset=1000, eval_subset=500, iterations=50_000, batch_size=64, lr=0.05,
                   momentum=0.8, weight_decay=5e-4, milestones=(30_000, 45_000), warmup_lr=0.01,
                   eval_every=500, seed=1, precision="fp32", pad_fill="black")
OTHER_BASE = dict(bottleneck=({"depth": 20}, True), gate_bias=({"arch": "highway"}, -3.0),  # fields valid elsewhere
                  warmup_err=({"warmup_lr": 0.01}, 0.7))


def test_every_field_that_changes_results_changes_the_hash():
    import dataclasses

    from resnet_lab.config import NON_RESULT_FIELDS

    assert NON_RESULT_FIELDS == {"activation_checkpointing", "fast", "compile"}  # speed and memory only
    names = {f.name for f in dataclasses.fields(RunConfig)} - NON_RESULT_FIELDS
    assert names == set(OTHER_VALUE) | set(OTHER_BASE), "a RunConfig field without a case here"
    for name in sorted(names):
        base, value = OTHER_BASE.get(name, ({}, OTHER_VALUE.get(name)))
        a = RunConfig(**base)
        assert RunConfig(**base, **{name: value}).hash != a.hash, name


def test_paper_preset_is_the_papers_recipe():
    c = make_config("paper", depth=56)
    assert (c.iterations, c.batch_size, c.lr, c.momentum, c.weight_decay) == (64_000, 128, 0.1, 0.9, 1e-4)
    assert c.milestones == (32_000, 48_000) and c.train_subset is None and c.split == "full"
    assert c.warmup_lr is None
    assert make_config("paper", depth=110).warmup_lr == 0.01  # the paper warms up 110 and 1202


@pytest.mark.parametrize("kw, words", [
    (dict(depth=21), ["depth=21", "6n+2"]),
    (dict(arch="dense"), ["arch='dense'", "plain", "resnet", "preact", "highway", "gated"]),
    (dict(shortcut="D"), ["shortcut='D'", "'A'", "'B'", "'C'"]),
    (dict(block_layers=3, depth=32), ["block_layers=3", "depths that work", "20"]),
    (dict(seed=-1), ["seed=-1"]),
    (dict(seed=True), ["seed=True", "integer from 0"]),  # else a folder apart from seed=1's
    (dict(seed=2**45), ["seed=35184372088832", "4294967295"]),  # else the loader's seed overflows mid-run
    (dict(block_layers=2.0), ["block_layers=2.0", "[1, 2, 3]"]),  # `2.0 in (1, 2, 3)`: failed at the model build
    (dict(block_layers=True), ["block_layers=True", "[1, 2, 3]"]),
    (dict(activation_checkpointing="two"), ["activation_checkpointing='two'", "integer >= 0"]),
    (dict(depth="abc"), ["depth='abc'", "6n+2"]),  # make_config's warm-up rule compared it first: a TypeError
    (dict(depth=None), ["depth=None", "6n+2"]),
    (dict(split="90-10"), ["split='90-10'", "45k5k"]),
    (dict(arch="gated", gate_bias="-6"), ["gate_bias='-6'", "finite number", "gated -6"]),
    (dict(block_layers=3, depth=21), ["depth=21", "3-layer blocks", "20, 38, 56"]),  # only depths that work
    (dict(gate_bias=-6.0), ["gate_bias=-6.0", "arch='resnet'", "'highway', 'gated'"]),  # no gate: no new folder
    (dict(weight_decay=-1e-4), ["weight_decay=-0.0001", ">= 0"]),
    (dict(momentum=1.5), ["momentum=1.5", "[0, 1)"]),
    (dict(warmup_lr=0.0), ["warmup_lr=0.0", "positive", "None"]),
    (dict(warmup_err=float("nan")), ["warmup_err=nan", "fraction"]),
    (dict(warmup_lr=0.01, warmup_err=5), ["warmup_err=5", "a fraction in (0, 1]"]),  # an error rate: never above 1
    (dict(warmup_err=0.5), ["warmup_err=0.5", "means nothing without warmup_lr", "leave it 0.8"]),  # no new folder
    (dict(milestones=(300, 300)), ["milestones=(300, 300)", "strictly increasing"]),
    (dict(milestones=(0,)), ["milestones=(0,)", "positive"]),
    (dict(bottleneck=True, block_layers=3, depth=20), ["block_layers=3", "bottleneck", "block_layers=2"]),
    (dict(train_subset=60_000), ["train_subset=60000", "50,000 images of split 'full'", "from 32 to 50000"]),
    (dict(split="45k5k", train_subset=50_000), ["train_subset=50000", "to 45000"]),
    (dict(eval_subset=20_000), ["eval_subset=20000", "from 1 to 10000"]),
    (dict(split="45k5k", eval_subset=8_000), ["eval_subset=8000", "5,000 images", "to 5000"]),
])
def test_bad_values_name_the_value_and_the_allowed_ones(kw, words):
    with pytest.raises(ValueError) as e:
        make_config("quick", **kw)
    for w in words:
        assert w in str(e.value)


def test_a_whole_number_is_the_same_run_as_its_float():
    """`--set weight_decay=0` (JSON: an int) and 0.0 are one run: one folder, and a DataFrame row (where pandas
    makes the column float) rebuilds the config of that folder."""
    from resnet_lab.config import RunConfig

    a = make_config("quick", weight_decay=0, momentum=0, lr=1, warmup_lr=1, warmup_err=1)
    b = make_config("quick", weight_decay=0.0, momentum=0.0, lr=1.0, warmup_lr=1.0, warmup_err=1.0)
    assert a.hash == b.hash and type(a.weight_decay) is float and type(a.lr) is float
    assert RunConfig.from_json({**a.to_json(), "weight_decay": 0.0}).hash == a.hash
    assert make_config("quick").warmup_lr is None


def test_numpy_integers_are_plain_ints():
    """A config rebuilt from a DataFrame row (numpy integers) is the same config, with the same folder."""
    import numpy as np

    a = make_config("quick", depth=np.int64(56), seed=np.int64(2), milestones=(np.int64(400),))
    b = make_config("quick", depth=56, seed=2, milestones=(400,))
    assert a == b and a.hash == b.hash and type(a.depth) is int and type(a.milestones[0]) is int


def test_bottleneck_model_rejects_other_block_layers():
    from resnet_lab.models import build_model

    with pytest.raises(ValueError, match="block_layers=3 is not valid for bottleneck"):
        build_model(bottleneck=True, block_layers=3, depth=20)


@pytest.mark.parametrize("width", [-4, 0, 2.5, True])
def test_build_model_refuses_a_width_that_is_not_a_positive_integer(width):
    """width=-4 gave torch's 'negative dimension' error, width=0 a zero-channel net with three warnings."""
    from resnet_lab.models import build_model

    with pytest.raises(ValueError, match=rf"width={width!r} is not valid: use a positive integer"):
        build_model("resnet", 20, width=width)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="preset='fast'.*paper.*quick.*smoke"):
        make_config("fast")
    with pytest.raises(ValueError, match="unknown RunConfig field.*'lerning_rate'"):
        make_config("quick", lerning_rate=0.1)


def test_check_depth():
    assert check_depth(56) == 9 and check_depth(1202) == 200
    assert check_depth(164, bottleneck=True) == 18
    with pytest.raises(ValueError, match="9n\\+2"):
        check_depth(58, bottleneck=True)
    assert set(PRESETS) == {"smoke", "quick", "paper"}


@pytest.mark.parametrize("field", ["fast", "compile", "bottleneck"])
def test_switches_take_true_or_false_only(field):
    """`--set fast=no` arrives as the string 'no', which Python would take for true."""
    with pytest.raises(ValueError, match=f"{field}='no' is not valid: use true or false"):
        make_config("quick", depth=20, **{field: "no"})


def test_a_dataframe_row_of_an_older_run_gives_its_config_back():
    """numpy bools as Python's; a switch the older run never stored (NaN in its column) at its default."""
    import numpy as np

    c = make_config("quick", depth=20, fast=False)
    row = {**c.to_json(), "fast": np.bool_(False), "compile": float("nan")}
    back = RunConfig.from_json(row)
    assert back == c and back.fast is False and back.compile is False


def test_a_run_name_says_a_precision_that_was_asked_for():
    """`--list` and the status lines name runs: the fidelity notebook's fp32 ResNet-20 is not its default twin."""
    assert make_config("paper", arch="resnet", depth=20).name == "resnet-20"
    assert make_config("paper", arch="resnet", depth=20, precision="fp32").name == "resnet-20 fp32"
    assert make_config("paper", arch="resnet", depth=56, shortcut="B", precision="fp16").name == "resnet-56 B fp16"
