"""Guards a third mutation review found untested: each test fails against the code with that line changed
(where the last ReLU sits, the bottleneck's stride, what normalisation and the loader feed a net, what a
table averages, which claims a verdict reads, what export and recovery keep, how a page shows nothing)."""
import json
import math
import os
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from .conftest import needs_data


def _kinds(seq):
    return [type(m).__name__ for m in seq]


# -- models ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, branch", [
    (dict(), ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]),
    (dict(block_layers=1), ["Conv2d", "BatchNorm2d"]),
    (dict(block_layers=3), ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d", "BatchNorm2d"]),
    (dict(depth=29, bottleneck=True, shortcut="B"), ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d", "BatchNorm2d"]),
])
def test_a_post_activation_branch_ends_in_bn_and_the_block_relu_comes_after_the_addition(kw, branch):
    """He et al. 2015: BN after every conv, ReLU after BN, but the block's last ReLU after the addition (a ReLU at
    the end of the branch would make every residual non-negative); the stem is conv-BN-ReLU."""
    from resnet_lab.models import build_model

    m = build_model("resnet", **{"depth": 20, **kw})
    assert _kinds(m.stem) == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert all(_kinds(b.branch) == branch and b.post_relu for b in m.blocks)


def test_a_preact_net_ends_in_bn_relu_before_the_pool():
    """He et al. 2016: nothing after a pre-activation block's addition, so the head must activate the sum."""
    from resnet_lab.models import build_model

    m = build_model("preact", 20)
    assert _kinds(m.head) == ["BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert _kinds(m.stem) == ["Conv2d"] and not any(b.post_relu for b in m.blocks)


def test_a_bottleneck_downsamples_on_its_first_1x1_conv():
    """He et al.'s placement (2015's ImageNet bottleneck, 2016's ResNet-164 code): the 1x1 reduce strided, the
    3x3 at stride 1 (fb.resnet.torch and torchvision stride the 3x3)."""
    from resnet_lab.models import build_model

    m = build_model("resnet", 29, bottleneck=True, shortcut="B")
    for b in m.blocks:
        convs = [x for x in b.branch if isinstance(x, nn.Conv2d)]
        s = 2 if b is m.blocks[3] or b is m.blocks[6] else 1
        assert [c.stride for c in convs] == [(s, s), (1, 1), (1, 1)]
        assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]


def test_a_preact_projection_shortcut_is_a_bare_conv():
    """He et al. 2016: in a pre-activation net the projection follows the shared BN-ReLU; it has no BN of its own."""
    from resnet_lab.models import build_model

    m = build_model("preact", 20, shortcut="B")
    projections = [b.shortcut for b in m.blocks if isinstance(b.shortcut, nn.Sequential)]
    assert len(projections) == 2 and all(_kinds(p) == ["Conv2d"] for p in projections)


# -- data ------------------------------------------------------------------------------------------------
@needs_data
def test_normalize_standardises_each_channel_of_cifar(cifar):
    """MEAN/STD are per channel, in RGB order: a class-balanced sample comes out at mean ~0 and std ~1 per channel
    (swapping R and B moves the means by ~0.2 and the stds by ~0.06)."""
    from resnet_lab.data import balanced_subset, normalize

    x, _ = balanced_subset(cifar.train_x, cifar.train_y, 5000)
    z = normalize(x)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.03


def test_an_eval_subset_is_class_balanced_not_a_prefix_of_the_sorted_test_set():
    """The copies on disk are sorted by class: the first 100 test images are all airplanes."""
    from resnet_lab.data import split_data

    data = types.SimpleNamespace(train_x=torch.arange(1000), train_y=torch.arange(1000) % 10,
                                 test_x=torch.arange(1000), test_y=torch.arange(10).repeat_interleave(100))
    _, _, ex, ey = split_data(data, "full", eval_subset=100)
    assert ey.bincount(minlength=10).tolist() == [10] * 10 and torch.equal(data.test_y[ex], ey)


def test_an_epoch_draws_every_image_once():
    """Batch i of an epoch is the i-th slice of the epoch's permutation: the batches of one epoch are disjoint."""
    from resnet_lab.data import DeviceLoader

    x, y = torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.arange(64)
    loader = DeviceLoader(x, y, batch_size=16, seed=0, device="cpu")
    seen = torch.cat([loader.batch(s)[1] for s in range(4)])
    assert sorted(seen.tolist()) == list(range(64))


def test_seeds_do_not_share_their_epochs_shuffles():
    """Seed s+1 must not replay seed s one epoch later: the seeds are the replicates every CI is over."""
    from resnet_lab.data import DeviceLoader

    x, y = torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.arange(64)
    plans = {(s, e): tuple(DeviceLoader(x, y, 16, s, "cpu")._epoch_plan(e)[0].tolist())
             for s in range(4) for e in range(4)}
    assert len(set(plans.values())) == len(plans)


def test_a_folders_id_covers_its_file_names(tmp_path):
    """An image folder's label is its class folder: the same bytes under another class are another dataset,
    whose decoded cache (keyed by this sha256) must not be reused."""
    from resnet_lab.data import _sha256

    for d, cls in (("a", "cat"), ("b", "dog")):
        (tmp_path / d / "train" / cls).mkdir(parents=True)
        (tmp_path / d / "train" / cls / "0.png").write_bytes(b"same bytes")
    assert _sha256(tmp_path / "a") != _sha256(tmp_path / "b")


# -- analysis --------------------------------------------------------------------------------------------
def test_diverged_runs_enter_neither_the_training_error_nor_its_interval():
    """The degradation claim rests on training error: a diverged run's NaN-logit error (~90%) must not be in it."""
    from resnet_lab.analysis import ci95, summarize

    runs = pd.DataFrame({"arch": ["plain"] * 3, "depth": [56] * 3, "status": ["done", "done", "diverged"],
                         "params": [1] * 3, "flops": [1] * 3, "final_train_err": [0.02, 0.04, 0.9],
                         "final_test_err": [0.1, 0.1, 0.9]})
    row = summarize(runs, ["arch", "depth"]).iloc[0]
    assert row["train_err_%"] == pytest.approx(3.0)
    assert row["train_err_ci95"] == pytest.approx(100 * ci95([0.02, 0.04]))


def test_gate_means_are_gate_values_in_0_1():
    """g(x) = sigmoid(1x1 conv(x) + b): with the conv zeroed every gate is sigmoid(b), not the logit b."""
    from resnet_lab.analysis import gate_means
    from resnet_lab.models import build_model

    m = build_model("gated", 8, gate_bias=-2.0)
    for b in m.blocks:
        nn.init.zeros_(b.gate.weight)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g = gate_means(m, [(x, torch.zeros(4, dtype=torch.long))])
    assert g["mean_gate"].tolist() == pytest.approx([1 / (1 + math.exp(2.0))] * 3)


def test_a_bottlenecks_response_layers_are_its_3x3_convs_only():
    from resnet_lab.analysis import response_layers
    from resnet_lab.models import build_model

    assert len(response_layers(build_model("resnet", 29, bottleneck=True, shortcut="B"))) == 1 + 9


# -- sweeps ----------------------------------------------------------------------------------------------
def test_a_notebook_whose_later_cells_never_started_is_not_clean(tmp_path):
    """A kernel that dies part-way: the cells after it are marked completed without a start time."""
    from resnet_lab import sweep

    ran = {"cell_type": "code", "metadata": {"papermill": {"status": "completed", "start_time": "2024-01-01T00:00:00"}}}
    never = {"cell_type": "code", "metadata": {"papermill": {"status": "completed", "start_time": None}}}
    nb = {"cells": [ran, never], "metadata": {"papermill": {"exception": False, "end_time": "2024-01-01T00:01:00"}}}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    assert not sweep.executed_ok(tmp_path / "nb.ipynb")


def test_a_kernel_that_dies_after_cells_ran_is_not_retried(tmp_path, monkeypatch):
    """Only a kernel that never started is retried: a retry after cells ran would run them again and overwrite
    the failed notebook, which is the point's log."""
    import papermill as pm

    from resnet_lab import sweep

    calls = []

    def dies(inp, out, **kw):
        calls.append(out)
        cell = {"cell_type": "code", "metadata": {"papermill": {"start_time": "2024-01-01T00:00:00"}}}
        Path(out).write_text(json.dumps({"cells": [cell], "metadata": {}}))
        raise RuntimeError("Kernel died")

    monkeypatch.setattr(pm, "execute_notebook", dies)
    res = sweep._execute_in_child({"input": "x.ipynb", "output": str(tmp_path / "o.ipynb"), "params": {},
                                   "kernel": "python3", "cwd": str(tmp_path)})
    assert not res["ok"] and res["attempts"] == 1 and len(calls) == 1 and "Kernel died" in res["error"]


# -- transfer --------------------------------------------------------------------------------------------
def test_export_sends_a_cached_analysis_the_receiver_lacks(tmp_path):
    """A run the receiver has as far along still goes when it brings an analysis the receiver's manifest lacks
    (04's take hours on a CPU)."""
    import io
    import tarfile

    from resnet_lab.transfer import export_runs, manifest

    from .test_transfer import HASH, make_run
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    name = "analysis-unravel-0123456789ab.json"
    (make_run(gpu, "aaa", "done", 6) / name).write_text("{}")
    make_run(here, "aaa", "done", 6)
    parts = export_runs(tmp_path / "out", root=gpu, skip=manifest(here))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        assert f"{HASH['aaa']}/{name}" in t.getnames()
    assert parts.runs == [HASH["aaa"]]


def _failing_replace(monkeypatch, when):
    real = os.replace

    def replace(src, dst):
        if when(Path(src), Path(dst)):
            raise OSError("disk went away")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_swap_that_fails_moving_the_new_copy_in_puts_the_old_one_back(tmp_path, monkeypatch):
    from resnet_lab import transfer

    from .test_transfer import HASH, make_run
    store = tmp_path / "store"
    local = make_run(store, "aaa", "running", 5)
    (local / "checkpoint.pt").write_bytes(b"resumable")
    _failing_replace(monkeypatch, lambda src, dst: ".importing-" in src.name)
    with pytest.raises(OSError):
        transfer._swap_in(store, HASH["aaa"], {"config.json": (local / "config.json").read_bytes()})
    assert (local / "checkpoint.pt").read_bytes() == b"resumable"
    assert json.loads((local / "summary.json").read_text())["steps_done"] == 5


def test_recovery_moves_config_json_last(tmp_path, monkeypatch):
    """Killed while putting a copy back, recovery leaves a folder without config.json (which the next import
    recovers again), never one that looks whole and lacks its model."""
    from resnet_lab import transfer

    from .test_transfer import HASH, make_run
    store, h = tmp_path / "store", HASH["aaa"]
    store.mkdir()
    os.replace(make_run(tmp_path / "staging", "aaa", "done", 6), store / f".{h}.replaced-x")
    (store / h).mkdir()
    _failing_replace(monkeypatch, lambda src, dst: dst.name == "model.pt")
    with pytest.raises(OSError):
        transfer._recover(store, h)
    assert not (store / h / "config.json").exists()


# -- claims ----------------------------------------------------------------------------------------------
def _lesion(net, arch, depth, seed, base_err, errs):
    return [dict(block=b, stage=0, changes_shape=False, has_shortcut=arch != "plain", err=e, base_err=base_err,
                 net=net, arch=arch, depth=depth, seed=seed) for b, e in enumerate(errs)]


def _claims(tmp_path, lesion=None, effective=None):
    from resnet_lab import claims

    base = tmp_path / "paper" / "04_unraveled_ensemble"
    base.mkdir(parents=True, exist_ok=True)
    if lesion is not None:
        pd.DataFrame(lesion).to_csv(base / "lesion.csv", index=False)
    if effective is not None:
        pd.DataFrame(effective).to_csv(base / "effective.csv", index=False)
    t = claims.check("paper", root=tmp_path)
    return dict(zip(t["claim"], t["holds"]))


def test_a_lesion_costs_its_mean_over_seeds_and_one_point_is_the_bar(tmp_path):
    """Block 0 costs +1.5 points in seed 0 and +0.1 in seed 1: +0.8 on average, under the 1-point bar; a net
    whose block costs +1.5 in its only seed is over it."""
    rows = (_lesion("ResNet-110", "resnet", 110, 0, 0.060, [0.075, 0.061])
            + _lesion("ResNet-110", "resnet", 110, 1, 0.060, [0.061, 0.061])
            + _lesion("pre-act ResNet-110", "preact", 110, 0, 0.060, [0.075, 0.061]))
    got = _claims(tmp_path, lesion=rows)
    assert got["single-block deletions barely hurt ResNet-110 (not at downsampling)"] == "yes"
    assert got["single-block deletions barely hurt pre-act ResNet-110 (not at downsampling)"] == "NO"


def test_a_plain_net_that_rises_far_but_stays_far_from_chance_has_not_collapsed(tmp_path):
    got = _claims(tmp_path, lesion=_lesion("plain-110", "plain", 110, 0, 0.10, [0.5, 0.5, 0.5]))
    assert got["plain-110 collapses when one block is deleted"] == "NO"


def test_the_lesion_and_path_claims_read_the_deepest_nets_only(tmp_path):
    """04's quick grid has ResNet-20 beside ResNet-110: the claims are about the deep net (Veit et al.'s 54 blocks)."""
    rows = (_lesion("ResNet-20", "resnet", 20, 0, 0.08, [0.2, 0.2]) + _lesion("ResNet-110", "resnet", 110, 0, 0.06,
                                                                              [0.061, 0.062]))
    eff = [dict(net="ResNet-20", arch="resnet", depth=20, seed=0, blocks=9, effective_from=3, effective_to=6),
           dict(net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=5, effective_to=17)]
    got = _claims(tmp_path, lesion=rows, effective=eff)
    lesion_rows = {k: v for k, v in got.items() if k.startswith("single-block deletions")}
    path_rows = {k: v for k, v in got.items() if k.startswith("the gradient comes from")}
    assert lesion_rows == {"single-block deletions barely hurt ResNet-110 (not at downsampling)": "yes"}
    assert path_rows == {"the gradient comes from paths much shorter than the net (ResNet-110)": "yes"}


# -- page and report -------------------------------------------------------------------------------------
def test_the_page_shows_a_dash_where_every_seed_diverged(tmp_path):
    from resnet_lab import page

    base = tmp_path / "paper" / "02_depth"
    base.mkdir(parents=True)
    pd.DataFrame([dict(depth=110, runs=0, params=1727962, wall_min=float("nan"), packed=1, device="cpu",
                       **{"paper_test_err_%": 6.61, "train_err_%": float("nan"), "train_err_ci95": float("nan"),
                          "test_err_%": float("nan"), "test_err_ci95": float("nan")})]).to_csv(base / "table.csv",
                                                                                             index=False)
    text = page.build_page("paper", root=tmp_path)
    assert "| 110 | 6.61 | 0 | – | – | 1,727,962 | – | 1 | cpu |" in text and "nan" not in text


@pytest.mark.parametrize("notebook", ["05_thousand_layers", "08_fast_path_fidelity"])
def test_the_pages_devices_come_from_every_run_table(tmp_path, notebook):
    """05's ResNet-1202 may be the only run of a GPU session: its device belongs on the page."""
    from resnet_lab import page

    base = tmp_path / "paper" / notebook
    base.mkdir(parents=True)
    pd.DataFrame([dict(runs=1, device="NVIDIA H200", dataset="ff26949c34c4e67d")]).to_csv(base / "table.csv",
                                                                                         index=False)
    assert "Devices: NVIDIA H200." in page.build_page("paper", root=tmp_path)


def test_a_report_leaves_the_backup_of_a_report_still_running_alone(tmp_path):
    """Two reports of one preset: the other's copy aside is not a leftover of a killed report while it runs."""
    from resnet_lab import report

    folder = tmp_path / "02_depth"
    folder.mkdir()
    (folder / "table.csv").write_text("new\n")
    other = tmp_path / f".02_depth.before-{os.getppid()}"  # a live process (this one's parent)
    other.mkdir()
    (other / "table.csv").write_text("old\n")
    backup = report._backup(folder, tmp_path / "executed" / "02_depth.ipynb")
    assert (folder / "table.csv").read_text() == "new\n" and (other / "table.csv").read_text() == "old\n"
    report._settle(folder, backup, ok=True)


def test_a_recovery_killed_part_way_is_completed_by_the_next_with_every_file(tmp_path, monkeypatch):
    """It deleted the files the killed recovery had moved (they are not in the copy aside any more): a finished
    run was left with config.json alone, reading as never started."""
    from resnet_lab import transfer

    from .test_transfer import HASH, make_run
    store, h = tmp_path / "store", HASH["aaa"]
    store.mkdir()
    os.replace(make_run(tmp_path / "staging", "aaa", "done", 6), store / f".{h}.replaced-x")
    (store / h).mkdir()
    want = sorted(p.name for p in (store / f".{h}.replaced-x").iterdir() if p.name != ".lock")
    _failing_replace(monkeypatch, lambda src, dst: dst.name == "config.json")  # killed after every other file
    with pytest.raises(OSError):
        transfer._recover(store, h)
    monkeypatch.undo()
    transfer._recover(store, h)
    assert sorted(p.name for p in (store / h).iterdir() if p.name != ".lock") == want


def test_a_recovery_killed_part_way_finishes_the_copy_it_began_not_its_twin(tmp_path, monkeypatch):
    """Both copies an import left are whole (killed between its renames): the done one is put back. Killed after
    its summary.json moved, that copy ranks below its twin; the next recovery must still finish it, not mix the
    twin's files into what came."""
    from resnet_lab import transfer

    from .test_transfer import HASH, make_run
    store, h = tmp_path / "store", HASH["aaa"]
    store.mkdir()
    os.replace(make_run(tmp_path / "a", "aaa", "done", 6), store / f".{h}.replaced-x")
    os.replace(make_run(tmp_path / "b", "aaa", "running", 5), store / f".{h}.importing-x")
    (store / h).mkdir()
    (store / h / ".lock").write_text("")
    _failing_replace(monkeypatch, lambda src, dst: dst.name == "config.json")  # killed after every other file
    with pytest.raises(OSError):
        transfer._recover(store, h)
    monkeypatch.undo()
    transfer._recover(store, h)
    assert json.loads((store / h / "summary.json").read_text()) == {"status": "done", "steps_done": 6}
    assert (store / h / "model.pt").read_bytes() == bytes(range(256)) * 40
    assert not (store / h / transfer.RECOVERING).exists() and not list(store.glob(f".{h}.*"))


def test_a_recovery_killed_part_way_over_a_restarted_run_finishes_the_copy_it_began(tmp_path, monkeypatch):
    """The folder holds a restart (its own config.json) that a leftover beats: killed part-way, the folder must
    not look whole with two copies' files in it, and the next recovery must finish the same copy."""
    from resnet_lab import transfer

    from .test_transfer import HASH, make_run
    store, h = tmp_path / "store", HASH["aaa"]
    make_run(store, "aaa", "running", 2)
    (store / h / "checkpoint.pt").write_bytes(b"restart")
    os.replace(make_run(tmp_path / "a", "aaa", "done", 6), store / f".{h}.replaced-x")
    os.replace(make_run(tmp_path / "b", "aaa", "running", 5), store / f".{h}.importing-x")
    _failing_replace(monkeypatch, lambda src, dst: (store / h / "summary.json").exists()
                     and json.loads((store / h / "summary.json").read_text())["steps_done"] == 6)
    with pytest.raises(OSError):
        transfer._recover(store, h)
    assert not (store / h / "config.json").exists()  # half-replaced: not whole, so the next import recovers
    monkeypatch.undo()
    transfer._recover(store, h)
    assert json.loads((store / h / "summary.json").read_text()) == {"status": "done", "steps_done": 6}
    assert (store / h / "model.pt").read_bytes() == bytes(range(256)) * 40
    assert (store / h / "checkpoint.pt").read_bytes() != b"restart"
    assert not (store / h / transfer.RECOVERING).exists() and not list(store.glob(f".{h}.*"))
