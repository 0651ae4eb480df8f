"""Tables and their intervals: what a reader compares with the paper."""
import math

import pandas as pd
import pytest
import torch

from resnet_lab.analysis import ci95, summarize
from resnet_lab.plots import t_interval

from .conftest import needs_data


def runs(statuses, test_errs):
    n = len(statuses)
    return pd.DataFrame({"arch": ["resnet"] * n, "depth": [20] * n, "status": statuses, "params": [269_722] * n,
                         "flops": [40_551_552] * n, "final_train_err": [0.01] * n, "final_test_err": test_errs,
                         "wall_seconds": [60.0] * n, "packed_runs": [1] * n, "device": ["cpu"] * n})


def test_diverged_runs_are_counted_not_averaged():
    t = summarize(runs(["done", "done", "diverged", "failed"], [0.08, 0.10, 0.90, 0.5]), ["arch", "depth"])
    row = t.iloc[0]
    assert row["runs"] == 2 and row["diverged"] == 1
    assert row["test_err_%"] == pytest.approx(9.0)
    assert row["test_err_ci95"] == pytest.approx(100 * ci95([0.08, 0.10]))


def test_wall_time_is_of_the_finished_runs_and_packed_the_most_a_run_shared():
    r = runs(["done", "done", "diverged"], [0.08, 0.10, 0.9]).assign(wall_seconds=[60.0, 120.0, 6.0],
                                                                    packed_runs=[1, 4, 2])
    row = summarize(r, ["arch", "depth"]).iloc[0]
    assert row["wall_min"] == pytest.approx(1.5) and row["packed"] == 4  # a diverged run's short clock is no net's time


def test_a_run_that_moved_between_devices_names_each_once_and_lends_no_wall_time():
    gpu, cpu = "NVIDIA H200", "cpu (AMD EPYC, x86_64, 2 threads)"
    r = runs(["done"] * 3, [0.12, 0.12, 0.13]).assign(wall_seconds=[270.0, 276.0, 7200.0],
                                                     device=[gpu, gpu, f"{gpu} + {cpu}"])
    row = summarize(r, ["arch", "depth"]).iloc[0]
    assert row["device"] == f"{gpu} + {cpu}"  # not 'NVIDIA H200 + NVIDIA H200 + cpu (...)'
    assert row["wall_min"] == pytest.approx(4.55)  # the H200's runs: the moved run's CPU hours are not its time
    assert row["runs"] == 3  # its error still counts
    moved = summarize(r.iloc[2:], ["arch", "depth"]).iloc[0]
    assert pd.isna(moved["wall_min"]) and moved["device"] == f"{gpu} + {cpu}"
    assert summarize(r.drop(columns="device"), ["arch", "depth"]).iloc[0]["wall_min"] == pytest.approx(7746 / 180)


def test_one_run_has_no_interval_rather_than_a_zero_one():
    row = summarize(runs(["done"], [0.08]), ["arch", "depth"]).iloc[0]
    assert row["runs"] == 1 and row["test_err_%"] == pytest.approx(8.0)
    assert math.isnan(row["test_err_ci95"]) and math.isnan(row["train_err_ci95"])
    assert ci95([0.08, 0.08]) == 0.0  # two equal seeds: an interval, of width 0


def test_a_config_whose_every_seed_diverged_shows_no_error():
    row = summarize(runs(["diverged"], [0.9]), ["arch", "depth"]).iloc[0]
    assert row["runs"] == 0 and row["diverged"] == 1 and math.isnan(row["test_err_%"])


def test_a_row_says_whether_its_runs_saw_the_official_pixels():
    r = runs(["done", "done"], [0.08, 0.1])
    assert summarize(r, ["arch", "depth"]).iloc[0]["pixels"] == ""  # summaries from before the field
    assert summarize(r.assign(official_pixels=[False, False]), ["arch", "depth"]).iloc[0]["pixels"] == "re-encoded"
    assert summarize(r.assign(official_pixels=[True, False]), ["arch", "depth"]).iloc[0]["pixels"] == \
        "official, re-encoded"


def test_a_row_says_how_its_runs_padded_their_crops():
    r = runs(["done", "done"], [0.08, 0.1])
    assert summarize(r.assign(pad_fill="mean"), ["arch", "depth"]).iloc[0]["pad_fill"] == "mean"
    assert summarize(r, ["arch", "depth"]).iloc[0]["pad_fill"] == ""  # a frame without the column says nothing


def test_figures_draw_the_tables_t_interval_not_a_bootstrap():
    v = [7.0, 8.0, 9.5]
    lo, hi = t_interval(v)
    mean = sum(v) / 3
    assert (lo + hi) / 2 == pytest.approx(mean) and (hi - lo) / 2 == pytest.approx(ci95(v))
    assert (hi - lo) / 2 > 4.3 * 0.5  # t(2) = 4.30 times a standard error of at least 0.5 here
    assert t_interval([8.0]) == (8.0, 8.0)


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    """Regenerated results must not show every PDF as changed (matplotlib stamps a creation date by default)."""
    import time

    import matplotlib.pyplot as plt

    from resnet_lab import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    first = [p.read_bytes() for p in plots.save(fig, tmp_path / "a", "f")]
    time.sleep(1.1)  # the PDF date has one-second resolution
    second = [p.read_bytes() for p in plots.save(fig, tmp_path / "b", "f")]
    plt.close(fig)
    assert first == second and first[1].startswith(b"%PDF")


def test_a_row_averages_seeds_of_one_config_only():
    """`load_runs(preset=...)` holds every variant: pooling option A with option C as seeds would be a mean of
    nothing. Seeds, and how a run was computed (checkpointing, the eager step), may differ."""
    r = runs(["done"] * 4, [0.08, 0.10, 0.09, 0.12]).assign(seed=[0, 1, 2, 0], shortcut=["A", "A", "A", "C"],
                                                            activation_checkpointing=[0, 2, 0, 0],
                                                            fast=[True, False, True, True])
    with pytest.raises(ValueError, match=r"differ in \{'shortcut': \['A', 'C'\]\}.*add \['shortcut'\] to `by`"):
        summarize(r, ["arch", "depth"])
    t = summarize(r, ["arch", "depth", "shortcut"])
    assert t["runs"].tolist() == [3, 1]
    # one value however the frame holds it: None and NaN, numpy and Python numbers, tuples and lists
    import numpy as np

    same = runs(["done"] * 4, [0.08, 0.10, 0.09, 0.12]).assign(
        seed=[0, 1, 2, 3], warmup_lr=[None, float("nan"), None, float("nan")],
        gate_bias=pd.Series([np.float64(-2.0), -2.0, -2, np.int64(-2)], dtype=object),
        milestones=pd.Series([(4,), [4], (np.int64(4),), [np.int64(4)]], dtype=object))
    assert summarize(same, ["arch", "depth"])["runs"].tolist() == [4]


def test_gate_means_number_blocks_as_the_lesion_table_does():
    """Block 0 is the first block in both tables: a reader matches a gate to a lesion by its number."""
    from resnet_lab.analysis import gate_means
    from resnet_lab.models import build_model
    from resnet_lab.unravel import lesion_blocks

    torch.manual_seed(0)
    model = build_model("highway", 8).eval()
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (8,))
    gates = gate_means(model, [(x, y)])
    assert gates["block"].tolist() == lesion_blocks(model, x, y)["block"].tolist() == [0, 1, 2]


def test_lesion_summary_averages_each_block_over_seeds_and_keeps_downsampling_apart():
    """04's summary: a block's error is its mean over seeds (the worst of all seeds' rows beside seed 0's intact
    error would mix seeds), the worst shape-keeping block and the worst downsampling block apart."""
    from resnet_lab.experiments import lesion_summary

    rows = [dict(net="ResNet-20", seed=s, block=b, changes_shape=b == 3, base_err=base, err=e)
            for s, base, errs in ((0, 0.10, [0.11, 0.12, 0.11, 0.50]), (1, 0.12, [0.13, 0.20, 0.13, 0.40]))
            for b, e in enumerate(errs)]
    rows += [dict(net="plain-20", seed=0, block=b, changes_shape=b == 1, base_err=0.1, err=e)
             for b, e in enumerate([0.9, float("nan"), 0.85])]
    t = lesion_summary(pd.DataFrame(rows)).set_index("net")
    r = t.loc["ResNet-20"]
    assert r["seeds"] == 2 and r["intact_err_%"] == pytest.approx(11.0) and r["worst_block"] == 1
    assert r["worst_err_%"] == pytest.approx(16.0) and r["downsampling_err_%"] == pytest.approx(45.0)
    # over the blocks that keep their shape (means 12, 16, 12), as the lesion claims: not the downsampling 45
    assert r["median_err_excl_downsampling_%"] == pytest.approx(12.0) and r["worst_blocks"] == "1"
    p = t.loc["plain-20"]
    assert p["worst_block"] == 0 and pd.isna(p["downsampling_err_%"])  # a plain net's cannot be removed
    assert p["median_err_excl_downsampling_%"] == pytest.approx(87.5)  # its transition block (NaN) left out
    assert lesion_summary(pd.DataFrame(rows).iloc[:0]).empty


def test_the_imagenet_table_names_the_device_it_timed_on():
    from resnet_lab.experiments import imagenet_architectures

    t = imagenet_architectures([18], batch_size=1, device="cpu", repeats=1, backward=False)
    assert t.loc[0, "device"].startswith("cpu (") and t.loc[0, "forward_s"] > 0 and "forward_backward_s" not in t
    assert t.loc[0, "params_M"] == pytest.approx(11.69, abs=0.01)


def test_macs_come_from_the_summarys_macs_and_old_summaries_flops():
    """A summary stored `flops` as multiply-adds (He et al.'s word) before it had `macs`; now flops = 2 * macs."""
    old = runs(["done"], [0.1])
    assert summarize(old, ["arch", "depth"]).iloc[0]["macs"] == 40_551_552
    new = old.assign(macs=[40_551_040], flops=[2 * 40_551_040])
    assert summarize(new, ["arch", "depth"]).iloc[0]["macs"] == 40_551_040
    both = pd.concat([old.assign(depth=56), new], ignore_index=True)  # load_runs: NaN where a summary lacks it
    t = summarize(both, ["arch", "depth"]).set_index("depth")
    assert (t.loc[20, "macs"], t.loc[56, "macs"]) == (40_551_040, 40_551_552)


@needs_data
def test_a_trained_runs_summary_has_its_macs_and_twice_as_many_flops(cifar, tmp_path):
    from resnet_lab.analysis import count_macs
    from resnet_lab.config import make_config
    from resnet_lab.models import model_from_config
    from resnet_lab.runs import load_runs
    from resnet_lab.train import train

    cfg = make_config("smoke", depth=8, iterations=1, eval_every=1)
    train(cfg, root=tmp_path, data=cifar, device="cpu")
    row = load_runs(tmp_path).iloc[0]
    assert row["macs"] == count_macs(model_from_config(cfg)) and row["flops"] == 2 * row["macs"]


def test_a_grouping_key_is_not_a_second_column_of_an_empty_table():
    """s25 diff review F5: grouped by pad_fill with no finished run, the empty table had pad_fill twice."""
    t = summarize(runs(["failed"], [0.5]).assign(pad_fill="mean"), ["arch", "depth", "pad_fill"])
    assert t.empty and list(t.columns).count("pad_fill") == 1
