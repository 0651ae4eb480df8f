"""Guards a fourth mutation review found untested: each test fails against the code with that line changed
(what a training row averages and when the last one is written, how a warm-up window is judged, which runs a
group may hold, which checkpoint a resume reads, what an atomic write leaves when it fails, which configs are
refused, which numbers a bench ratio and schedule divide, what a figure's band and line are over, and the
exit code of a notebook's training that stopped part-way)."""
import importlib
import math
import re
import time
import types

import pandas as pd
import pytest
import torch
from torch import nn


# -- train: what one evaluation row says ---------------------------------------------------------------
def _bare_run(tmp_path, cfg, warming_up=False, seconds=0.0):
    """A `train._Run` with no data, net or files behind it but a metrics path, a linear net and 8 test images:
    enough to feed `account` chosen losses and wrong counts and read the rows it writes."""
    from resnet_lab.train import _Run

    run = object.__new__(_Run)
    z = lambda: torch.zeros(())  # noqa: E731
    torch.manual_seed(0)
    run.cfg, run.rd = cfg, types.SimpleNamespace(metrics_file=tmp_path / "metrics.csv")
    run.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    run.ex, run.ey = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10
    run.loader = types.SimpleNamespace(steps_per_epoch=10)
    run.bar = types.SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None)
    run.group, run.status, run.rows, run.start, run.step_no, run.end = None, "running", [], 0, 0, cfg.iterations
    run.seconds, run.t0, run.last_ckpt, run.checkpoint_every_s = seconds, time.time(), time.time(), 1e9
    run.warming_up, run.warmup_end = warming_up, None
    run.loss_acc, run.wrong_acc, run.win_wrong, run.seen, run.win_seen = z(), z(), z(), 0, 0
    return run


def test_a_training_row_is_the_per_image_mean_of_its_own_window(tmp_path):
    """train_loss and train_err of a row are over the steps since the last evaluation, per image: the
    accumulators start again at each row (else the second window carries the first one's wrong count or
    images), and a step's mean loss counts once per image of its batch."""
    from resnet_lab.config import make_config

    cfg = make_config("smoke", depth=8, iterations=4, eval_every=2, milestones=(3,))
    run = _bare_run(tmp_path, cfg)
    for loss, wrong in ((2.0, 8), (4.0, 8), (1.0, 2), (1.0, 0)):  # batches of 8
        run.account(0.05, torch.tensor(loss), torch.tensor(float(wrong)), 8)
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert list(rows["step"]) == [2, 4] and run.status == "done"
    assert list(rows["train_loss"]) == pytest.approx([3.0, 1.0])
    assert list(rows["train_err"]) == pytest.approx([1.0, 2 / 16])
    assert list(rows["epoch"]) == pytest.approx([0.2, 0.4])  # steps done / steps per epoch


def test_the_last_step_is_evaluated_when_the_schedule_is_not_a_multiple_of_eval_every(tmp_path):
    """A run's final errors are those of its last step: with 5 iterations and eval_every 3 the table would
    otherwise report the model of step 3 as the trained one."""
    from resnet_lab.config import make_config

    cfg = make_config("smoke", depth=8, iterations=5, eval_every=3, milestones=(4,))
    run = _bare_run(tmp_path, cfg)
    for _ in range(5):
        run.account(0.05, torch.tensor(1.0), torch.tensor(1.0), 8)
    assert list(pd.read_csv(tmp_path / "metrics.csv")["step"]) == [3, 5] and run.status == "done"


def test_a_resumed_rows_seconds_count_the_earlier_sittings(tmp_path):
    """`seconds` in a row is the run's wall time so far: a run resumed after 100 s says more than 100 s."""
    from resnet_lab.config import make_config

    cfg = make_config("smoke", depth=8, iterations=6, eval_every=1, milestones=(4,))
    run = _bare_run(tmp_path, cfg, seconds=100.0)
    run.account(0.05, torch.tensor(1.0), torch.tensor(1.0), 8)
    assert run.rows[-1]["seconds"] >= 100.0


def test_each_warmup_window_is_judged_on_its_own_training_error(tmp_path):
    """He et al.: lr 0.01 until training error < 80%. Each WARMUP_CHECK_EVERY-step window is read on its own;
    a window that kept the previous one's wrong count would read 100% after a perfect window and never end."""
    from resnet_lab.config import make_config
    from resnet_lab.train import WARMUP_CHECK_EVERY

    cfg = make_config("quick", depth=20, warmup_lr=0.01, iterations=1000, eval_every=1000, milestones=(900,))
    run = _bare_run(tmp_path, cfg, warming_up=True)
    for step in range(2 * WARMUP_CHECK_EVERY):
        wrong = 8.0 if step < WARMUP_CHECK_EVERY else 0.0  # all wrong, then none
        run.account(0.01, torch.tensor(2.0), torch.tensor(wrong), 8)
        if step == WARMUP_CHECK_EVERY - 1:
            assert run.warming_up  # 100% in the first window: still warming up
    assert not run.warming_up and run.warmup_end == 2 * WARMUP_CHECK_EVERY


# -- config ----------------------------------------------------------------------------------------------
def test_the_shallowest_nets_have_one_block_per_stage():
    """6n+2 and 9n+2 need n >= 1: depth 2 (n = 0) is a net of no blocks, a folder of its own for the stem alone."""
    from resnet_lab.config import check_depth

    assert check_depth(8) == 1 and check_depth(11, bottleneck=True) == 1
    for kw in (dict(), dict(bottleneck=True)):
        with pytest.raises(ValueError, match="depth=2 is not valid"):
            check_depth(2, **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(momentum=1.0), "momentum=1.0"),  # a momentum of 1 never forgets a gradient
    (dict(lr=0.0), "lr=0.0"),  # trains nothing, in a folder of its own
    (dict(arch="highway", gate_bias=float("inf")), "gate_bias=inf"),
    (dict(arch="plain", shortcut="B"), "shortcut='B' means nothing for arch='plain'"),  # the same net as 'A'
    (dict(milestones=5), "milestones=5 is not valid: use a list"),
])
def test_values_that_name_no_other_run_are_refused(kw, needle):
    """Each would train a net the paper does not describe, or the same net under a second hash."""
    from resnet_lab.config import make_config

    with pytest.raises(ValueError, match=re.escape(needle)):
        make_config("quick", **kw)


def test_the_smoke_preset_never_warms_up():
    """The warm-up rule (110+ layers) is the quick and paper presets'; smoke's few steps never leave it."""
    from resnet_lab.config import make_config

    assert make_config("smoke", depth=110).warmup_lr is None and make_config("quick", depth=110).warmup_lr == 0.01


# -- unravel ---------------------------------------------------------------------------------------------
def test_a_bottlenecks_first_block_widens_inside_stage_0():
    """A bottleneck net's first block changes the shape (16 to 64 channels) without starting a stage: the
    lesion table's `stage` is 0, 1, 2 for its three stages, as for every other net."""
    from resnet_lab.models import build_model
    from resnet_lab.unravel import block_stages

    m = build_model("resnet", 29, bottleneck=True, shortcut="B")
    assert m.blocks[0].changes_shape and block_stages(m.blocks) == [0] * 3 + [1] * 3 + [2] * 3


# -- train: a diverged run is finished --------------------------------------------------------------------
def test_a_diverged_run_is_finished_keeps_no_checkpoint_and_is_not_trained_again(cifar, tmp_path, monkeypatch):
    """'diverged' is a result (runs.FINISHED): trained again it diverges again, so `train` hands the stored run
    back as it does a done one, and, as a done one, it leaves no checkpoint for an export to ship."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import CHECKPOINT_FILES

    T = importlib.import_module("resnet_lab.train")  # the module, not the `train` function re-exported

    cfg = make_config("smoke", depth=8, lr=1e6, iterations=8, eval_every=2, batch_size=16, train_subset=256,
                      eval_subset=64, milestones=(6,))
    T.train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=1)  # leaves a checkpoint at step 1
    rec = T.train(cfg, root=tmp_path, data=cifar, device="cpu")
    assert rec.status == "diverged" and not any((rec.path / n).exists() for n in CHECKPOINT_FILES)
    monkeypatch.setattr(T, "_train_locked", lambda *a, **k: pytest.fail("trained a diverged config again"))
    assert T.train(cfg, root=tmp_path, data=cifar, device="cpu").summary == rec.summary


def test_the_gradient_of_a_length_is_the_mean_norm_of_its_paths_times_their_count():
    """Veit et al.'s total per length k: the mean over the sampled paths (not their median, which skewed norms
    pull down) times C(m, k)."""
    from resnet_lab.models import build_model
    from resnet_lab.unravel import gradient_by_path_length

    torch.manual_seed(0)
    m = build_model("resnet", 14).eval()  # 6 blocks
    x, y = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6)
    df = gradient_by_path_length(m, x, y, ks=[2], samples=4, batch=2)
    assert df["mean_grad_norm"].iloc[0] == pytest.approx(df["grad_norm"].mean(), rel=1e-12)
    assert df["total"].iloc[0] == pytest.approx(df["grad_norm"].mean() * math.comb(6, 2), rel=1e-12)


def test_every_seed_and_k_draws_from_a_stream_of_its_own():
    """Deletions, reorderings and sampled paths of one run (seed) are independent of another's: seed s at
    k + 1 must not replay seed s + 1 at k."""
    from resnet_lab.unravel import _rng

    firsts = {_rng(s, k).random() for s in range(5) for k in range(55)}
    assert len(firsts) == 5 * 55


def _tiny(**kw):
    from resnet_lab.config import make_config

    base = dict(arch="resnet", depth=8, iterations=4, eval_every=2, batch_size=16, train_subset=256, eval_subset=64,
                milestones=(3,))
    return make_config("smoke", **{**base, **kw})


def test_a_grouped_runs_training_error_counts_its_own_images(cifar, tmp_path):
    """A member of a grouped net books its own batch (len(y) / members images), so its train_err is a lone
    run's (a grouped run booking every member's images would read 1/N of it)."""
    from resnet_lab.train import train, train_many

    cfgs = [_tiny(seed=s, iterations=2, milestones=(1,)) for s in (0, 1)]
    alone = [train(c, root=tmp_path / "a", data=cifar, device="cpu") for c in cfgs]
    grouped = train_many(cfgs, root=tmp_path / "g", data=cifar, device="cpu", pack=2, group=True)
    for a, g in zip(alone, grouped):
        assert g.summary["grouped_runs"] == 2
        assert list(g.metrics["train_err"]) == pytest.approx(list(a.metrics["train_err"]), abs=0.07)


def test_runs_at_different_steps_are_not_grouped(cifar, tmp_path):
    """A group steps all its members at one step (one batch index, one lr): a seed resumed at step 2 beside a
    fresh one trains on its own, or it would get the fresh one's batches and schedule."""
    from resnet_lab.train import train, train_many

    cfgs = [_tiny(seed=s) for s in (0, 1)]
    train(cfgs[1], root=tmp_path, data=cifar, device="cpu", stop_after=2)
    out = train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2, group=True)
    assert [r.status for r in out] == ["done", "done"]
    assert [r.summary.get("grouped_runs") for r in out] == [None, None]


def test_sittings_listed_past_the_checkpoint_are_not_taken_for_its_own():
    """A checkpoint written before sittings were kept resumes at its own step: the summary's list counts only if
    it ends there (a later sitting, killed after this checkpoint, listed steps the resume will redo)."""
    from resnet_lab.train import _earlier_sittings

    listed = [{"from_step": 0, "to_step": 4, "device": "cpu"}, {"from_step": 4, "to_step": 10, "device": "cpu"}]
    summary = {"sittings": listed, "device": "cpu", "compute_dtype": "fp32", "step_mode": "eager"}
    assert _earlier_sittings(summary, 10, 3.0) == listed
    (one,) = _earlier_sittings(summary, 6, 3.0)
    assert (one["from_step"], one["to_step"], one["device"], one["seconds"]) == (0, 6, "cpu", 3.0)


# -- bench: which numbers a ratio or a schedule is made of --------------------------------------------------
def _fake_measurements(monkeypatch, bench):
    """Measurements stood in for by numbers: the graph step 2x our eager one, checkpointing 5x slower."""
    monkeypatch.setattr(bench, "baseline_images_per_s", lambda *a, **k: 100.0)
    def ours(depth, *a, activation_checkpointing=0, fast=True, **k):
        slow = 5 if activation_checkpointing else 1
        return (400.0 if fast else 200.0) / slow, 0.01 * slow, bench.peak_mb(None), "graph" if fast else "eager", None

    monkeypatch.setattr(bench, "ours_images_per_s", ours)
    monkeypatch.setattr(bench, "eval_seconds", lambda *a, **k: 2.0)


def test_the_bench_gains_and_schedules_divide_the_right_numbers(cifar, tmp_path, monkeypatch):
    """graph_gain is the graph step over our eager one (CUDA only), and the checkpointed schedule is timed at
    the checkpointed step, not the plain one (what a small GPU would plan ResNet-1202 by)."""
    from resnet_lab import bench

    _fake_measurements(monkeypatch, bench)
    monkeypatch.setattr(bench, "device_name", lambda dev: f"fake {dev.type}")
    monkeypatch.setattr(bench, "_fresh_peak", lambda dev: None)
    monkeypatch.setattr(bench, "peak_mb", lambda dev: {"peak_mem_mb": None, "peak_reserved_mb": None})
    kw = dict(seconds=0.1, images=256, data=cifar, packs=[], batch_size=16)
    (row,) = bench.run_bench([8], device="cuda", out=tmp_path / "gpu", **kw)["rows"]
    assert row["graph_gain"] == pytest.approx(2.0) and row["speedup"] == pytest.approx(4.0)
    (row,) = bench.run_bench([8], device="cpu", out=tmp_path / "cpu", checkpointing=True, ckpt_min_depth=8,
                             **kw)["rows"]
    assert row["ckpt_schedule_min"] == pytest.approx((64_000 * 0.05 + 64 * 2.0) / 60)
    assert row["paper_schedule_min"] == pytest.approx((64_000 * 0.01 + 64 * 2.0) / 60)


# -- experiments and plots ------------------------------------------------------------------------------------
def test_a_k_axis_has_about_ten_points_whatever_the_number_of_blocks():
    """delete-k and reorder-k are measured at about ten k (each costs `draws` evaluations of the test set): the
    step is rounded, so 17 pairs step by 2, not by 1 (18 points); a small net takes every k."""
    from resnet_lab.experiments import _spread

    assert _spread(17) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 17]
    assert all(len(_spread(top)) <= 14 for top in range(1, 300)) and _spread(5) == [0, 1, 2, 3, 4, 5]


def test_the_lesion_figures_intact_line_is_the_mean_over_seeds():
    """The dashed line of a net is its unlesioned error averaged over its seeds, as its lesion points are (one
    seed's would sit off the points of a net whose seeds differ)."""
    from resnet_lab import plots

    rows = [dict(block=b, stage=0, changes_shape=False, has_shortcut=True, err=base + 0.05, base_err=base,
                 net="ResNet-8", arch="resnet", depth=8, seed=s) for s, base in ((0, 0.1), (1, 0.3)) for b in range(3)]
    fig = plots.lesion_figure(pd.DataFrame(rows))
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([20.0, 20.0])


# -- runs: the files -------------------------------------------------------------------------------------------
def test_infinities_are_written_as_null_like_nan(tmp_path):
    """JSON has no infinities either: a run whose loss overflowed to inf must still write its summary (with
    allow_nan=False an inf left in would raise, and the run would end failed instead of diverged)."""
    import json

    from resnet_lab.runs import atomic_write_json

    atomic_write_json(tmp_path / "s.json", {"loss": float("inf"), "curve": [1.0, float("-inf"), float("nan")]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"loss": None, "curve": [1.0, None, None]}


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path):
    """Atomic writes: a save that raises part-way (disk full, an object torch cannot pickle) leaves the file as
    it was, never a truncated one, and no temp file beside it."""
    from resnet_lab.runs import atomic_save_torch

    f = tmp_path / "checkpoint.pt"
    atomic_save_torch({"step": 1}, f)
    good = f.read_bytes()
    with pytest.raises(Exception):
        atomic_save_torch({"step": 2, "bad": lambda: None}, f)
    assert f.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_resume_takes_the_newest_checkpoint(cifar, tmp_path):
    """checkpoint.pt is the newest and checkpoint.prev.pt the one before (kept while the next is written): a
    resume reads the newest first, or it redoes the steps between them."""
    from resnet_lab.fast import make_optimizer
    from resnet_lab.models import model_from_config
    from resnet_lab.runs import RunDir
    from resnet_lab.train import _resume, resolve_dataset, train

    cfg = resolve_dataset(_tiny(iterations=8), cifar)
    train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=2)
    part = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=4)
    assert (part.path / "checkpoint.prev.pt").exists()
    model = model_from_config(cfg)
    opt = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)[0]
    assert _resume(RunDir(cfg, tmp_path), model, opt)["step"] == 4


# -- fast ------------------------------------------------------------------------------------------------------
def test_a_compiled_forward_must_also_agree_on_the_bn_statistics():
    """inductor rewrites BatchNorm: a compiled step whose running statistics drift is refused even when its loss
    and update agree; a graph (the eager kernels replayed) is judged on loss and update."""
    from resnet_lab.fast import _require_agreement

    check = {"loss_rel_diff": 0.0, "update_rel_diff": 0.0, "bn_stats_rel_diff": 1.0}
    with pytest.raises(RuntimeError, match="compiled step disagrees"):
        _require_agreement(check, "compiled")
    _require_agreement(check, "graph")


def test_an_error_line_is_the_first_line_of_the_message():
    """What a summary or table says of dynamo's or CUDA's pages-long errors: the type and the first line only."""
    from resnet_lab.fast import error_line

    assert error_line(RuntimeError("first line\n" + "traceback\n" * 50)) == "RuntimeError: first line"
    assert error_line(ValueError("x" * 1000), 20) == "ValueError: " + "x" * 8


def test_a_figure_saved_again_is_byte_identical(tmp_path):
    """Regenerated results leave an unchanged figure unchanged in git: no creation date in the PDF."""
    import matplotlib.pyplot as plt

    from resnet_lab import plots

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    first = [p.read_bytes() for p in plots.save(fig, tmp_path, "f", "a note")]
    time.sleep(1.1)  # a date in the file would now differ
    assert [p.read_bytes() for p in plots.save(fig, tmp_path, "f", "a note")] == first


def test_the_total_gradient_band_is_over_seeds_not_over_sampled_paths():
    """Each run has one total per length (its mean norm times C(m, k), repeated on every sampled path's row):
    the band is a t-interval over seeds; over the rows it would count each seed `samples` times, and narrow."""
    from resnet_lab import plots

    rows = [dict(k=k, sample=s, blocks=(), grad_norm=1.0, mean_grad_norm=1.0, paths=1.0, total=total, net="ResNet-8",
                 seed=seed) for seed, total in ((0, 1.0), (1, 3.0)) for k in (0, 1) for s in range(5)]
    grad = pd.DataFrame(rows)
    paths = pd.DataFrame(dict(k=[0, 1], paths=[1, 1], share=[0.5, 0.5], net="ResNet-8"))
    fig = plots.paths_figure(paths, grad, pd.DataFrame(columns=["net", "effective_from", "effective_to"]))
    ys = fig.axes[2].collections[0].get_paths()[0].vertices[:, 1]
    lo, hi = plots.t_interval([1.0, 3.0])
    assert (ys.min(), ys.max()) == pytest.approx((lo, hi))


def test_a_warmup_still_on_at_the_first_milestone_is_said_at_that_step(tmp_path, caplog):
    """The recipe does not say what a warm-up still on at the first milestone does: the run says so when that
    step is reached (a run whose schedule ends there would otherwise never say it)."""
    from resnet_lab.config import make_config

    cfg = make_config("quick", depth=20, warmup_lr=0.01, iterations=1000, eval_every=1000, milestones=(5,))
    run = _bare_run(tmp_path, cfg, warming_up=True)
    with caplog.at_level("WARNING"):
        for _ in range(5):
            run.account(0.01, torch.tensor(2.0), torch.tensor(8.0), 8)
    assert "still warming up" in caplog.text and "step 5" in caplog.text


# -- cli ---------------------------------------------------------------------------------------------------------
def test_train_of_a_notebook_exits_1_while_a_run_is_stopped_part_way(cifar, tmp_path, monkeypatch, capsys):
    """Exit 0 means every run finished: a --time-budget that stops a run part-way leaves work to do (1), as a
    failed run does, so a script calling it again knows to."""
    from resnet_lab import cli
    from resnet_lab import experiments as ex
    from resnet_lab.train import RunRecord

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "train_all", lambda cfgs, **kw: [
        RunRecord(c, tmp_path / c.hash, {"status": "running", "steps_done": 2}, pd.DataFrame()) for c in cfgs])
    argv = ["train", "--notebook", "02_depth", "--preset", "smoke", "-p", "depths=[8]", "-p", "seeds=[0]",
            "--device", "cpu", "--quiet", "--time-budget", "5"]
    assert cli.main(argv) == 1 and "stopped" in capsys.readouterr().out


# -- fast: a grouped step's per-member numbers -------------------------------------------------------------------
def test_a_grouped_step_reports_each_members_own_loss_and_wrong_count():
    """GroupedNets stacks member i's batch in rows i*B..(i+1)*B: its loss and wrong count are those rows' (a
    reduction over the other axis would mix the members, while the summed gradient stayed right)."""
    import torch.nn.functional as F

    from resnet_lab.data import normalize
    from resnet_lab.fast import make_optimizer, step_body
    from resnet_lab.grouped import GroupedNets
    from resnet_lab.models import build_model

    nets = []
    for s in (0, 1):
        torch.manual_seed(s)
        nets.append(build_model("resnet", 8))
    x = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        outs = [n.train()(normalize(x[i])) for i, n in enumerate(nets)]
    y = torch.stack([outs[0].argmax(1), (outs[1].argmax(1) + 1) % 10])  # member 0 all right, member 1 all wrong
    want_loss = [float(F.cross_entropy(o, y[i])) for i, o in enumerate(outs)]
    want_wrong = [int((o.argmax(1) != y[i]).sum()) for i, o in enumerate(outs)]
    g = GroupedNets(nets)
    loss, wrong = step_body(g, make_optimizer(g, 0.1, 0.9, 1e-4)[0], x.flatten(0, 1), y.flatten(), "fp32", members=2)
    assert loss.tolist() == pytest.approx(want_loss, rel=1e-4) and wrong.tolist() == want_wrong == [0, 4]
