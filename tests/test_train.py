import importlib
import json
import math
import time

import pandas as pd
import pytest
import torch

from resnet_lab.config import make_config
from resnet_lab.runs import RunDir, load_metrics, load_runs
from resnet_lab.train import train

from .conftest import needs_data

pytestmark = needs_data


def tiny(**kw):
    base = dict(arch="resnet", depth=8, iterations=8, eval_every=2, batch_size=16, train_subset=256,
                eval_subset=64, milestones=(6,))
    base.update(kw)
    return make_config("smoke", **base)


def test_test_error_is_measured_in_fp32_whatever_the_training_precision(cifar, results):
    """A bf16-trained run's recorded test loss is the fp32 evaluation of its weights, not a bf16 one."""
    from resnet_lab.data import eval_batches, split_data
    from resnet_lab.train import evaluate

    rec = train(tiny(precision="bf16", iterations=2, eval_every=2), root=results, data=cifar, device="cpu")
    assert rec.summary["compute_dtype"] == "bf16"
    model = RunDir(rec.config, results).load_model("cpu")
    _, _, x, y = split_data(cifar, "full", None, 64)  # the run's evaluation images
    fp32, bf16 = (evaluate(model, eval_batches(x, y), p) for p in ("fp32", "bf16"))
    assert fp32 != bf16  # the two precisions tell apart on this net
    assert rec.metrics["test_loss"].iloc[-1] == pytest.approx(fp32[0], rel=1e-6)


def test_smoke_run_lowers_training_loss(cifar, results):
    cfg = tiny(iterations=40, eval_every=10, milestones=(30,), lr=0.05, batch_size=32)
    rec = train(cfg, root=results, data=cifar, device="cpu")
    m = rec.metrics
    assert rec.status == "done" and list(m["step"]) == [10, 20, 30, 40]
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0] - 0.1
    s = rec.summary
    assert s["params"] == 75_290  # ResNet-8: 6n+2 with n=1, counted by hand
    assert s["dataset_sha256"] == cifar.info.sha256 and s["official_pixels"] is False
    assert s["compute_dtype"] == "fp32"  # precision "auto" on the CPU
    assert (rec.path / "model.pt").exists() and not (rec.path / "checkpoint.pt").exists()


def test_resume_is_bit_exact(cifar, tmp_path):
    cfg = tiny()
    straight = train(cfg, root=tmp_path / "a", data=cifar, device="cpu")
    part = train(cfg, root=tmp_path / "b", data=cifar, device="cpu", stop_after=3)  # mid eval interval
    assert part.status == "running" and (part.path / "checkpoint.pt").exists()
    resumed = train(cfg, root=tmp_path / "b", data=cifar, device="cpu")
    assert resumed.status == "done"
    cols = ["step", "lr", "train_loss", "train_err", "test_loss", "test_err"]
    pd.testing.assert_frame_equal(straight.metrics[cols], resumed.metrics[cols], check_exact=True)
    a = torch.load(straight.path / "model.pt", weights_only=True)
    b = torch.load(resumed.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_config_is_not_retrained(cifar, results, monkeypatch):
    cfg = tiny(iterations=2, eval_every=2)
    first = train(cfg, root=results, data=cifar, device="cpu")
    mtime = (first.path / "summary.json").stat().st_mtime_ns
    T = importlib.import_module("resnet_lab.train")  # the module, not the `train` function re-exported
    monkeypatch.setattr(T, "_train_locked", lambda *a, **k: pytest.fail("trained a finished config"))
    again = train(cfg, root=results, data=cifar, device="cpu")
    assert again.summary == first.summary and (first.path / "summary.json").stat().st_mtime_ns == mtime


def test_checkpoints_a_kill_left_beside_a_finished_run_go_at_its_next_call(cifar, results):
    """Killed between its final summary and deleting its checkpoints, a run kept them for good: every later call
    returned the stored run at once (a ResNet-1202's are 310 MB, and `runs manifest` said it had one)."""
    from resnet_lab.train import train_many

    cfg = tiny(iterations=2, eval_every=2)
    for call in (lambda: train(cfg, root=results, data=cifar, device="cpu"),
                 lambda: train_many([cfg], root=results, data=cifar, device="cpu")[0]):
        rec = call()
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (rec.path / name).write_bytes(b"left by a kill")
        again = call()
        assert again.status == "done" and again.summary == rec.summary
        assert not any((rec.path / n).exists() for n in ("checkpoint.pt", "checkpoint.prev.pt"))


def test_a_finished_run_in_a_read_only_store_is_returned_with_its_leftover_checkpoints(cifar, results,
                                                                                      monkeypatch, caplog):
    """Removing them is tidying: where the store cannot be written, train hands the finished run back."""
    import pathlib

    cfg = tiny(iterations=2, eval_every=2)
    rec = train(cfg, root=results, data=cifar, device="cpu")
    (rec.path / "checkpoint.pt").write_bytes(b"left by a kill")
    real = pathlib.Path.unlink

    def read_only(self, *a, **k):
        if self.name.startswith("checkpoint"):
            raise OSError(30, "Read-only file system")
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    assert train(cfg, root=results, data=cifar, device="cpu").status == "done"
    assert "Read-only file system" in caplog.text


def test_divergence_is_recorded_not_raised(cifar, results):
    rec = train(tiny(lr=1e6, iterations=4), root=results, data=cifar, device="cpu")
    assert rec.status == "diverged"
    text = (rec.path / "summary.json").read_text()
    assert json.loads(text)["status"] == "diverged"
    # strict JSON (no bare NaN, which JavaScript's parser and jq --strict refuse): a NaN loss is null
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert strict["final_test_loss"] is None or math.isfinite(strict["final_test_loss"])


def test_warmup_switches_to_base_lr(cifar, results):
    # warm-up threshold 1.0: the first check (after 20 steps) ends it
    rec = train(tiny(iterations=24, eval_every=4, warmup_lr=0.01, warmup_err=1.0, milestones=()), root=results,
                data=cifar, device="cpu")
    lrs = rec.metrics.set_index("step")["lr"]
    assert lrs[20] == 0.01 and lrs[24] == 0.05 and rec.summary["warmup_end_step"] == 20


def test_load_runs_and_metrics(cifar, results):
    for arch in ("plain", "resnet"):
        train(tiny(arch=arch, iterations=2, eval_every=2), root=results, data=cifar, device="cpu")
    runs = load_runs(results)
    assert set(runs["arch"]) == {"plain", "resnet"} and (runs["status"] == "done").all()
    assert {"final_test_err", "params", "hash", "name"} <= set(runs.columns)
    train(tiny(arch="plain", iterations=2, eval_every=2, train_subset=None, seed=3), root=results, data=cifar,
          device="cpu")  # a column with gaps: pandas turns None into NaN and ints into floats
    runs = load_runs(results)
    assert runs["train_subset"].isna().sum() == 1 and len(set(runs["name"])) == 2
    from resnet_lab.config import RunConfig

    assert {RunConfig.from_json(r).hash for r in runs.to_dict("records")} == set(runs["hash"])
    curves = load_metrics(results, arch="plain", seed=0)
    assert set(curves["arch"]) == {"plain"} and len(curves) == 1
    with pytest.raises(KeyError, match="no column 'colour'"):
        load_runs(results, colour="red")
    # None matches a missing value (all three have no warm-up); a tuple a column of tuples whole
    assert len(load_runs(results, warmup_lr=None)) == 3 and len(load_runs(results, train_subset=None)) == 1
    assert len(load_runs(results, milestones=tuple(tiny().milestones))) == 3
    assert len(load_runs(results, milestones=(999,))) == 0 and len(load_runs(results, seed=(0, 3))) == 3
    rd = RunDir(tiny(arch="plain", iterations=2, eval_every=2, dataset=cifar.info.sha256[:16]), results)
    model = rd.load_model()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)  # analyses run in the fast layout


def _same_curves(a, b):
    cols = ["step", "lr", "train_loss", "train_err", "test_loss", "test_err"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols], check_exact=True)
    wa = torch.load(a.path / "model.pt", weights_only=True)
    wb = torch.load(b.path / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_packed_runs_learn_what_lone_runs_learn(cifar, tmp_path):
    from resnet_lab.train import train_many

    cfgs = [tiny(), tiny(arch="plain", seed=1), tiny(depth=14, iterations=6, eval_every=3, milestones=())]
    alone = [train(c, root=tmp_path / "a", data=cifar, device="cpu") for c in cfgs]
    train(cfgs[1], root=tmp_path / "b", data=cifar, device="cpu", stop_after=3)  # one member resumes mid-run
    packed = train_many(cfgs, root=tmp_path / "b", data=cifar, device="cpu", pack=3)
    for a, p in zip(alone, packed):
        assert p.status == "done" and p.summary["packed_runs"] == 3 and p.summary["step_mode"] == "eager"
        assert "CUDA device" in p.summary["step_mode_reason"]
        _same_curves(a, p)
    with pytest.raises(ValueError, match="pack=0 is not valid"):
        train_many(cfgs, root=tmp_path / "b", data=cifar, device="cpu", pack=0)


def test_a_failing_packed_run_does_not_stop_the_others(cifar, tmp_path, monkeypatch):
    T = importlib.import_module("resnet_lab.train")
    real = T.evaluate

    def evaluate(model, *a, **k):
        if model.depth == 14:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, *a, **k)

    monkeypatch.setattr(T, "evaluate", evaluate)
    ok, bad = tiny(), tiny(depth=14)
    out = T.train_many([bad, ok], root=tmp_path, data=cifar, device="cpu", pack=2)
    assert out[0] is None and out[1].status == "done"
    s = RunDir(T.resolve_dataset(bad, cifar), tmp_path).summary()
    assert s["status"] == "failed" and "illegal memory access" in s["error"]


def test_a_pack_that_raises_after_storing_a_run_still_returns_that_run(cifar, tmp_path, monkeypatch):
    """Say the last summary write of a pack hits a full disk: the runs it finished are on disk, and the caller
    (which prints each run's status) must see them as finished, not as lost."""
    T = importlib.import_module("resnet_lab.train")
    real = T._train_pack

    def pack(*a, **k):
        real(*a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "_train_pack", pack)
    out = T.train_many([tiny()], root=tmp_path, data=cifar, device="cpu")
    assert out[0] is not None and out[0].status == "done"


def test_time_budget_stops_with_a_checkpoint_and_the_next_call_resumes(cifar, tmp_path):
    from resnet_lab.train import train_many

    cfg = tiny()
    straight = train(cfg, root=tmp_path / "a", data=cifar, device="cpu")
    part = train(cfg, root=tmp_path / "b", data=cifar, device="cpu", time_budget_s=0)
    assert part.status == "running" and part.summary["steps_done"] == 1 and (part.path / "checkpoint.pt").exists()
    again = train_many([cfg], root=tmp_path / "b", data=cifar, device="cpu", time_budget_s=0)[0]
    assert again.status == "running" and again.summary["steps_done"] == 1  # the budget was spent before it began
    resumed = train_many([cfg], root=tmp_path / "b", data=cifar, device="cpu")[0]
    assert resumed.status == "done"
    _same_curves(straight, resumed)
    for bad in (-1, float("nan"), "60", True):  # the CLI refuses these; the Python API says so too
        with pytest.raises(ValueError, match=r"time_budget_s=.* is not valid: use a number of seconds >= 0"):
            train(tiny(seed=9), root=tmp_path / "c", data=cifar, device="cpu", time_budget_s=bad)
        with pytest.raises(ValueError, match=r"time_budget_s=.* is not valid"):
            train_many([tiny(seed=9)], root=tmp_path / "c", data=cifar, device="cpu", time_budget_s=bad)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("summary.json"))


def test_a_config_given_twice_trains_once(cifar, tmp_path):
    """Twice in one pack, a config would wait for ever on its own lock (a grid may list a depth twice)."""
    import threading

    from resnet_lab.train import train_many

    a, b = tiny(), tiny(arch="plain")
    out = []
    t = threading.Thread(target=lambda: out.append(train_many([a, b, a], root=tmp_path, data=cifar, device="cpu",
                                                              pack=3)), daemon=True)
    t.start()
    t.join(300)
    assert not t.is_alive(), "train_many waits on its own lock"
    recs = out[0]
    assert [r.status for r in recs] == ["done"] * 3 and recs[0].path == recs[2].path
    assert recs[0].summary["packed_runs"] == 2


def test_one_time_budget_spans_small_and_lone_deep_nets(monkeypatch):
    """train_all trains nets deeper than LONE_DEPTH in a call of their own: both calls share one deadline, or
    `--time-budget 540` on ResNet-110 + ResNet-1202 would run 1080 s and outlast a 10-minute GPU call."""
    import time

    from resnet_lab import experiments as ex

    seen = []
    monkeypatch.setattr(ex, "load_cifar10", lambda source=None: None)

    def fake(cfgs, deadline=None, **kw):
        seen.append((sorted(c.depth for c in cfgs), deadline, kw.get("time_budget_s")))
        time.sleep(0.05)
        return [None] * len(cfgs)
    monkeypatch.setattr(ex, "train_many", fake)
    t0 = time.monotonic()
    ex.train_all([make_config("paper", depth=d) for d in (110, 1202)], device="cpu", time_budget_s=540)
    assert [s[0] for s in seen] == [[110], [1202]] and seen[0][1] == seen[1][1]
    assert t0 + 540 <= seen[0][1] <= time.monotonic() + 540 and seen[0][2] is None
    with pytest.raises(ValueError, match="time_budget_s=-5 is not valid"):
        ex.train_all([make_config("paper", depth=110)], device="cpu", time_budget_s=-5)


def test_progress_without_a_checkpoint_starts_again_and_says_so(cifar, tmp_path, caplog):
    """A run whose progress came without its checkpoint (ResNet-1202's is over an export's limit) cannot
    resume: it starts at step 0, says so, and its metrics.csv never shows the earlier start's rows."""
    import json
    import shutil

    from resnet_lab.train import train_many

    cfg = tiny()
    straight = train(cfg, root=tmp_path / "a", data=cifar, device="cpu")
    moved = tmp_path / "b" / straight.path.relative_to(tmp_path / "a")
    moved.mkdir(parents=True)
    for f in ("config.json", "metrics.csv"):
        shutil.copy(straight.path / f, moved / f)
    (moved / "summary.json").write_text(json.dumps({"status": "running", "steps_done": 6}))
    part = train(cfg, root=tmp_path / "b", data=cifar, device="cpu", time_budget_s=0)
    assert part.status == "running" and part.summary["steps_done"] == 1
    assert "says step 6 but there is no checkpoint" in caplog.text
    assert part.metrics.empty  # no evaluation yet in this start: the old rows are gone, not shown as its own
    resumed = train_many([cfg], root=tmp_path / "b", data=cifar, device="cpu")[0]
    _same_curves(straight, resumed)


def test_the_paper_preset_on_the_cpu_is_announced_before_it_starts(cifar, tmp_path, caplog):
    """64k iterations take hours to days on a CPU: said before the first step, not found out from a progress bar."""
    from resnet_lab.train import train_many

    paper = [make_config("paper", depth=20, seed=s) for s in (0, 1)]
    train_many(paper + [tiny()], root=tmp_path, data=cifar, device="cpu", time_budget_s=0)
    warned = [r.getMessage() for r in caplog.records if "long schedule on the CPU" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 run(s)") and "resnet-20" in warned[0] and "64,000" in warned[0]
    assert "preset paper" in warned[0]
    caplog.clear()
    train_many([tiny(), make_config("paper", depth=8, iterations=2, milestones=(1,))], root=tmp_path, data=cifar,
               device="cpu", time_budget_s=0)
    assert "long schedule" not in caplog.text  # the preset's name alone does not make a run long
    # the schedule does: a quick config given the paper's length is as long
    train_many([make_config("quick", depth=8, iterations=64_000, batch_size=128, milestones=(32_000,))],
               root=tmp_path, data=cifar, device="cpu", time_budget_s=0)
    assert "preset quick" in caplog.text


def _close_curves(a, b):
    """Equal up to float rounding, which a few SGD steps on tiny batches amplify (running the same lone
    run on 1 thread instead of 2 moves these losses by up to 3e-3): a gross error (lr, weight decay,
    gradient scale, momentum) moves them far more."""
    pd.testing.assert_frame_equal(a.metrics[["step", "lr"]], b.metrics[["step", "lr"]])
    assert b.metrics["train_loss"].iloc[0] == pytest.approx(a.metrics["train_loss"].iloc[0], rel=1e-5)
    assert list(b.metrics["train_loss"]) == pytest.approx(list(a.metrics["train_loss"]), rel=1e-2)
    assert list(b.metrics["test_loss"]) == pytest.approx(list(a.metrics["test_loss"]), rel=1e-2)
    wa = torch.load(a.path / "model.pt", weights_only=True)
    wb = torch.load(b.path / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k].float(), wb[k].float(), atol=0.1) for k in wa)


def test_grouped_seeds_learn_what_lone_runs_learn_and_resume_either_way(cifar, tmp_path):
    from resnet_lab.train import train_many

    cfgs = [tiny(seed=s) for s in (0, 1, 2)] + [tiny(arch="plain")]
    alone = [train(c, root=tmp_path / "a", data=cifar, device="cpu") for c in cfgs]
    straight = train_many(cfgs, root=tmp_path / "g", data=cifar, device="cpu", pack=4, group=True)
    for a, g in zip(alone, straight):
        assert g.status == "done"
        _close_curves(a, g)
    part = train_many(cfgs, root=tmp_path / "b", data=cifar, device="cpu", pack=4, group=True, stop_after=3)
    assert [p.status for p in part] == ["running"] * 4 and all((p.path / "checkpoint.pt").exists() for p in part)
    assert [p.summary.get("grouped_runs") for p in part] == [3, 3, 3, None]  # the plain net is no seed of them
    resumed = train_many(cfgs, root=tmp_path / "b", data=cifar, device="cpu", pack=4, group=True)
    for g, r in zip(straight, resumed):  # weights, BN statistics and momentum came back exactly
        _same_curves(g, r)
    # a grouped run's checkpoint resumes alone: the files are a lone run's
    train_many(cfgs[:2], root=tmp_path / "c", data=cifar, device="cpu", pack=2, group=True, stop_after=3)
    lone = train(cfgs[1], root=tmp_path / "c", data=cifar, device="cpu")
    _close_curves(alone[1], lone)


def test_seeds_far_apart_in_the_list_are_packed_together_when_grouping(cifar, tmp_path):
    from resnet_lab.train import train_many

    cfgs = [tiny(seed=0), tiny(depth=14), tiny(seed=1)]
    out = train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2, group=True, stop_after=2)
    assert [r.summary.get("grouped_runs") for r in out] == [2, None, 2]


def test_a_cpu_run_names_its_processor(tmp_path, monkeypatch):
    """Short CPU runs differ between processors (other float kernels): the device column says which one."""
    import platform

    from resnet_lab.train import cpu_model, device_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13\nflags\t: fpu\n")
    assert cpu_model(str(info)) == "AMD EPYC 7B13"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_model(str(tmp_path / "missing")) is None
    mod = importlib.import_module("resnet_lab.train")  # the module: the package's `train` is the function
    monkeypatch.setattr(mod, "cpu_model", lambda: None)
    assert device_name(torch.device("cpu")) == f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    monkeypatch.setattr(mod, "cpu_model", lambda: "AMD EPYC 7B13")
    assert device_name(torch.device("cpu")).startswith("cpu (AMD EPYC 7B13, ")


def test_progress_refreshes_rarely_where_stderr_is_not_a_terminal(cifar, tmp_path, monkeypatch):
    """An executed notebook keeps every refresh of the bar: off a terminal it redraws every few seconds."""
    import io

    from resnet_lab.train import PROGRESS_EVERY_S, progress_interval

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_interval(Tty()) == 0.1 and progress_interval(io.StringIO()) == PROGRESS_EVERY_S >= 1
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.delenv("CI", raising=False)
    t0 = time.monotonic()
    rec = train(tiny(iterations=240, eval_every=120, batch_size=4, milestones=(180,)), tmp_path, device="cpu",
                progress=True)
    wall = time.monotonic() - t0
    assert rec.status == "done" and "resnet-8" in err.getvalue()
    # the first draw, one per evaluation (its numbers), the close, and one per interval the run lasted (no
    # fixed count: a loaded machine takes minutes over this run); at 0.1 s a run of 1 s drew 13 here
    assert err.getvalue().count("\r") <= 5 + wall / PROGRESS_EVERY_S, (wall, err.getvalue())


def test_a_resume_drops_the_rows_of_a_sitting_killed_after_its_last_checkpoint(cifar, tmp_path):
    """Killed after evaluating step 6 but before checkpointing it, then resumed from step 4 and stopped at 5: the
    stored curve must end at 4 (the step-6 point was of steps this run will redo), on disk, not only in memory."""
    cfg = tiny()
    part = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=4)
    rows = pd.read_csv(part.path / "metrics.csv")
    stale = rows.iloc[-1:].assign(step=6, test_err=0.5)
    pd.concat([rows, stale]).to_csv(part.path / "metrics.csv", index=False)
    again = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=5)
    assert again.summary["steps_done"] == 5 and pd.read_csv(again.path / "metrics.csv")["step"].tolist() == [2, 4]


def test_the_summary_lists_every_sitting_and_names_both_devices(cifar, tmp_path, monkeypatch):
    """A run trained grouped on one device and finished alone on another: the top-level fields are not only the
    last sitting's; `sittings` says where and how each stretch of steps ran, and resume reads it back."""
    T = importlib.import_module("resnet_lab.train")
    cfgs = [tiny(), tiny(seed=1)]
    real = T.device_name
    monkeypatch.setattr(T, "device_name", lambda d: "Fake GPU")
    T.train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2, group=True, stop_after=4)
    monkeypatch.setattr(T, "device_name", real)
    rec = T.train(cfgs[0], root=tmp_path, data=cifar, device="cpu")
    s = rec.summary
    assert s["status"] == "done" and s["device"] == f"Fake GPU + {real(torch.device('cpu'))}"
    assert [(x["from_step"], x["to_step"], x["device"], x["grouped_runs"], x["packed_runs"]) for x in s["sittings"]] \
        == [(0, 4, "Fake GPU", 2, 2), (4, 8, real(torch.device("cpu")), None, 1)]
    assert all(x["step_mode"] == "eager" and x["compute_dtype"] == "fp32" and x["seconds"] >= 0 for x in s["sittings"])
    assert s["compute_dtype"] == "fp32"  # one dtype throughout: no join
    # a sitting that trains nothing (started, stopped at once) is no device of the run's
    monkeypatch.setattr(T, "device_name", lambda d: "Fake GPU")
    other = T.train(tiny(seed=2), root=tmp_path, data=cifar, device="cpu", stop_after=4)
    monkeypatch.setattr(T, "device_name", real)
    again = T.train(tiny(seed=2), root=tmp_path, data=cifar, device="cpu", stop_after=4)
    assert other.summary["device"] == again.summary["device"] == "Fake GPU" and len(again.summary["sittings"]) == 1
    # an old checkpoint's summary names joined devices: no one sitting ran on both
    joined = {"device": "Fake GPU + cpu", "compute_dtype": "fp32", "step_mode": "graph"}
    assert T._earlier_sittings(joined, 4, 1.5)[0]["device"] is None
    listed = {**joined, "sittings": [{"from_step": 0, "to_step": 4, "device": "Fake GPU"}]}
    assert T._earlier_sittings(listed, 4, 1.5) == listed["sittings"]


def test_a_grouped_pack_is_freed_when_it_ends(cifar, tmp_path, monkeypatch):
    """Runs and their group point at each other; a cycle waits for the garbage collector, and with it the pack's
    GPU memory (models, graph pool, a device copy of the data per run). Finished runs let go of their group."""
    import gc
    import weakref

    T = importlib.import_module("resnet_lab.train")
    refs = []
    real = T._Group.__init__

    def init(self, runs):
        real(self, runs)
        refs.append(weakref.ref(self.model))
    monkeypatch.setattr(T._Group, "__init__", init)
    gc.collect()
    gc.disable()
    try:
        out = T.train_many([tiny(), tiny(seed=1)], root=tmp_path, data=cifar, device="cpu", pack=2, group=True)
        assert [r.status for r in out] == ["done", "done"] and len(refs) == 1
        assert refs[0]() is None, "the grouped net outlived its pack"
    finally:
        gc.enable()


def test_a_checkpoint_from_before_sittings_resumes_with_one_sitting_from_its_summary(cifar, tmp_path):
    T = importlib.import_module("resnet_lab.train")
    part = train(tiny(), root=tmp_path, data=cifar, device="cpu", stop_after=4)
    ckpt = torch.load(part.path / "checkpoint.pt", weights_only=True)
    del ckpt["sittings"]
    torch.save(ckpt, part.path / "checkpoint.pt")
    summary = json.loads((part.path / "summary.json").read_text())  # as the code before sittings wrote it
    del summary["sittings"]
    (part.path / "summary.json").write_text(json.dumps(summary))
    rec = train(tiny(), root=tmp_path, data=cifar, device="cpu")
    first, second = rec.summary["sittings"]
    assert (first["from_step"], first["to_step"], second["from_step"], second["to_step"]) == (0, 4, 4, 8)
    assert first["step_mode"] == "eager" and first["seconds"] == round(float(ckpt["seconds"]), 3)
    assert first["device"] == T.device_name(torch.device("cpu"))


def test_the_warmup_warning_is_for_a_warmup_still_on_at_the_first_milestone(cifar, tmp_path, caplog):
    """The first check (step 20) ends this warm-up: nothing to warn of at a milestone at step 20. One that never
    ends (threshold 0.01) is warned of there."""
    ends = train(tiny(iterations=24, eval_every=4, warmup_lr=0.01, warmup_err=1.0, milestones=(20,)),
                 root=tmp_path, data=cifar, device="cpu")
    assert ends.summary["warmup_end_step"] == 20 and "still warming up" not in caplog.text
    never = train(tiny(iterations=24, eval_every=4, warmup_lr=0.01, warmup_err=0.01, milestones=(20,)),
                  root=tmp_path, data=cifar, device="cpu")
    assert never.summary["warmup_end_step"] is None and "still warming up" in caplog.text


def test_eager_runs_are_packed_apart_from_graph_runs(cifar, tmp_path, monkeypatch):
    """A pack steps in lockstep: the fidelity notebook's fp32 eager reference must not set its graph-stepped
    mates' pace."""
    T = importlib.import_module("resnet_lab.train")
    packs = []
    monkeypatch.setattr(T, "_train_pack", lambda cfgs, chunk, *a, **k: packs.append([c.fast for c in cfgs]) or {})
    from resnet_lab.train import train_many

    cfgs = [tiny(seed=0), tiny(seed=1, precision="fp32", fast=False), tiny(seed=2), tiny(seed=3)]
    train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2)
    assert packs == [[True, True], [True], [False]]


def test_a_run_stepped_two_ways_says_both_in_its_summary(cifar, tmp_path):
    """step_mode joins the sittings' modes as compute_dtype does: the fidelity check must not take a reference
    that ran part of its schedule as a graph for an eager one."""
    cfg = tiny()
    part = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=3)
    ck = torch.load(part.path / "checkpoint.pt", weights_only=True)
    assert [s["step_mode"] for s in ck["sittings"]] == ["eager"]
    ck["sittings"][0]["step_mode"] = "graph"  # as if the first sitting had run on a GPU
    torch.save(ck, part.path / "checkpoint.pt")
    rec = train(cfg, root=tmp_path, data=cifar, device="cpu")
    assert rec.status == "done" and rec.summary["step_mode"] == "graph + eager"


def test_train_takes_device_auto_as_every_entry_point_does(cifar, results):
    """`train(cfg, device="auto")` gave torch's 'Expected one of cpu, cuda, ...' error: auto is what --device,
    train_all and a notebook's device parameter default to."""
    from resnet_lab.train import device_name

    rec = train(tiny(iterations=2, eval_every=2), root=results, data=cifar, device="auto")
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert rec.status == "done" and rec.summary["device"] == device_name(here)


def test_a_bad_device_or_pack_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    """A device name torch does not take came back as its own error listing twenty device kinds; pack=0 was
    logged as a failed run after the dataset had loaded, and the call returned [None]."""
    from resnet_lab import experiments as ex

    T = importlib.import_module("resnet_lab.train")  # the package exports a function of that name

    def boom(*a, **k):
        raise AssertionError("the data loaded")

    monkeypatch.setattr(T, "load_cifar10", boom)
    monkeypatch.setattr(ex, "load_cifar10", boom)
    cfg = tiny()
    message = "device='gpu' is not valid: use auto, cpu, cuda or cuda:N"
    for call in (lambda: train(cfg, root=tmp_path, device="gpu"), lambda: ex.train_all([cfg], device="gpu"),
                 lambda: T.train_many([cfg], root=tmp_path, device="gpu"),
                 lambda: ex.imagenet_architectures([18], device="gpu")):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    for pack in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"pack={pack!r} is not valid: use an integer >= 1"):
            ex.train_all([cfg], root=tmp_path, pack=pack)
    assert not any(tmp_path.iterdir())


def test_lr_is_divided_by_ten_at_each_milestone():
    """The paper's schedule: 0.1, /10 at 32k and again at 48k (the step of the milestone already the lower one)."""
    from resnet_lab.train import lr_at

    cfg = make_config("paper", depth=20)
    got = {s: lr_at(cfg, s, warming_up=False) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
    assert got == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001})
    assert lr_at(make_config("paper", depth=110), 40_000, warming_up=True) == 0.01


def test_a_run_trains_at_its_schedules_lr(cifar, results):
    rec = train(tiny(iterations=8, eval_every=2, milestones=(4, 6)), root=results, data=cifar, device="cpu")
    # a row's lr is that of the last step before its evaluation (steps 0-3 at 0.05, 4-5 at 0.005, 6-7 at 0.0005)
    assert rec.metrics.set_index("step")["lr"].to_dict() == pytest.approx({2: 0.05, 4: 0.05, 6: 0.005, 8: 0.0005})


def test_each_seed_sets_the_init_and_the_batches(cifar, tmp_path, monkeypatch):
    """Seeds are the replicates every CI is over: a run's seed must reach both its initial weights and its
    loader (shuffle, crops, flips), and two seeds must differ in both."""
    T = importlib.import_module("resnet_lab.train")
    seen = []
    real_loader, real_model = T.DeviceLoader, T.model_from_config
    monkeypatch.setattr(T, "DeviceLoader", lambda x, y, bs, seed, dev, *rest: seen.append(("loader", seed)) or
                        real_loader(x, y, bs, seed, dev, *rest))
    monkeypatch.setattr(T, "model_from_config", lambda cfg: seen.append(("init", torch.initial_seed())) or
                        real_model(cfg))
    for s in (0, 3):
        train(tiny(seed=s, iterations=2, eval_every=2), root=tmp_path, data=cifar, device="cpu")
    assert seen == [("loader", 0), ("init", 0), ("loader", 3), ("init", 3)]
    torch.manual_seed(0)
    w0 = real_model(tiny(seed=0)).state_dict()
    torch.manual_seed(3)
    w3 = real_model(tiny(seed=3)).state_dict()
    assert not torch.equal(next(iter(w0.values())), next(iter(w3.values())))  # the first conv's weights
    x, y = cifar.train_x[:64], cifar.train_y[:64]
    assert not torch.equal(real_loader(x, y, 16, 0, "cpu").batch(0)[0], real_loader(x, y, 16, 3, "cpu").batch(0)[0])


# stopped during the warm-up (which ends at the first check, step 20), after it, and during one that never
# ends (an untrained net's ~90% error stays above 0.6; its first check must count the window's first 10 steps)
@pytest.mark.parametrize("stop,threshold,end", [(10, 1.0, 20), (21, 1.0, 20), (10, 0.6, None)])
def test_a_warmup_run_resumes_bit_exact(cifar, tmp_path, stop, threshold, end):
    """ResNet-110 and -1202 warm up and are the runs split across GPU calls: a resume must keep the warm-up
    where it was (still on, or over at its recorded step), with its window of training errors."""
    cfg = tiny(iterations=24, eval_every=4, warmup_lr=0.01, warmup_err=threshold, milestones=(22,))
    straight = train(cfg, root=tmp_path / "a", data=cifar, device="cpu")
    part = train(cfg, root=tmp_path / "b", data=cifar, device="cpu", stop_after=stop)
    assert part.status == "running"
    resumed = train(cfg, root=tmp_path / "b", data=cifar, device="cpu")
    cols = ["step", "lr", "train_loss", "train_err", "test_loss", "test_err"]
    pd.testing.assert_frame_equal(straight.metrics[cols], resumed.metrics[cols], check_exact=True)
    assert straight.summary["warmup_end_step"] == resumed.summary["warmup_end_step"] == end


def test_grouped_seeds_train_with_the_configs_optimizer_settings(cifar, tmp_path, monkeypatch):
    """The packed net gets its own optimizer: it must take the runs' lr, momentum and weight decay (a weight
    decay lost there changes little in a few steps, so it is checked where it is set)."""
    from resnet_lab.train import train_many

    T = importlib.import_module("resnet_lab.train")
    made, real = [], T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda model, lr, momentum, wd: made.append((lr, momentum, wd)) or
                        real(model, lr, momentum, wd))
    cfgs = [tiny(seed=s, iterations=2, eval_every=2, weight_decay=5e-3, momentum=0.8) for s in (0, 1)]
    train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2, group=True)
    assert len(made) == 3 and set(made) == {(0.05, 0.8, 5e-3)}  # each run's own, then the group's


def test_packs_hold_what_a_gpu_call_can_send_back_and_carry_into_the_next():
    """A GPU session stops its last pack part-way, and each run's checkpoint (weights and momentum) must come
    back in the call's files and go into the next session's call, both under the device tool's 64 MiB. Four
    110-layer nets (about 56 MiB) do not: whichever was left behind started again at step 0 each session.
    With pack_mb the packs are cut, in order, to what fits; a run too big alone is a pack of its own."""
    from resnet_lab.models import count_params, model_from_config
    from resnet_lab.train import check_pack_mb, checkpoint_mib, pack_chunks

    def cfg(depth, seed=0, **kw):
        return make_config("paper", depth=depth, seed=seed, **kw)

    r110 = checkpoint_mib(cfg(110, 3))  # seed 3: the same build as seed 0's
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    assert checkpoint_mib(cfg(56, 9)) > 0 and torch.rand(1) == expected  # the caller's generator left alone
    params = count_params(model_from_config(cfg(110)))
    assert 8 * params / 2**20 < r110 < 8 * params / 2**20 + 1.5  # weights + momentum, and the file's bookkeeping
    assert checkpoint_mib(cfg(20)) < 3 < r110 < 15
    cfgs = [cfg(56), cfg(110), cfg(110, 1), cfg(110, 2), cfg(20), cfg(20, 1, fast=False), cfg(1202)]
    order = list(range(len(cfgs)))
    assert pack_chunks(cfgs, order, 4) == [[0, 1, 2, 3], [4, 6], [5]]  # graph runs and eager apart, as before
    chunks = pack_chunks(cfgs, order, 4, 33)
    assert chunks == [[0, 1], [2, 3, 4], [6], [5]]  # 7 + 14 fit 33, a third net then would not; the 1202 alone
    assert all(sum(checkpoint_mib(cfgs[i]) for i in c) <= 33 for c in chunks if len(c) > 1)
    assert pack_chunks(cfgs, [3, 4, 1], 2, 1000) == [[3, 4], [1]]  # the order given, pack still the cap
    for bad in (0, -1.0, float("nan"), float("inf"), "30", True):
        with pytest.raises(ValueError, match=r"pack_mb=.* is not valid: use a positive number of MiB"):
            check_pack_mb(bad)


def test_runs_stopped_part_way_resume_before_new_ones_start(cifar, tmp_path, monkeypatch):
    """A session that ends part-way leaves one pack unfinished; if the next trained its grids in order from the
    top, a run begun earlier would wait while new ones started, and two packs' checkpoints would have to
    travel. Stopped runs go first, in the order given; grouping keeps seeds together where the first stands."""
    from resnet_lab.train import train_many

    T = importlib.import_module("resnet_lab.train")
    cfgs = [tiny(seed=0), tiny(seed=1), tiny(seed=2), tiny(depth=14)]
    for c in cfgs[2:]:  # a step and a checkpoint each, as a call's time budget leaves them
        rec = train(c, root=tmp_path, data=cifar, device="cpu", time_budget_s=0)
        assert rec.status == "running"
        real = (rec.path / "checkpoint.pt").stat().st_size / 2**20
        assert real <= T.checkpoint_mib(c) <= 1.15 * real + 0.05, (real, T.checkpoint_mib(c))  # never below
    packs = []
    monkeypatch.setattr(T, "_train_pack", lambda c, chunk, *a, **k: packs.append([x.seed for x in c]) or {})
    train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2)
    assert packs == [[2, 0], [0, 1]]  # seed 2 and the 14-layer net (seed 0) first, then seeds 0 and 1
    packs.clear()
    train_many(cfgs, root=tmp_path, data=cifar, device="cpu", pack=2, group=True)
    assert packs == [[2, 0], [0, 1]]  # grouped: resumed runs still first (a group steps from one start step),
    #                                   then the new seeds 0 and 1 side by side (helper-93: 2, 0 | 1, 0 had left
    #                                   a third checkpoint to carry)
    packs.clear()
    eager = [tiny(seed=5), tiny(seed=6, precision="fp32", fast=False)]
    assert train(eager[1], root=tmp_path, data=cifar, device="cpu", time_budget_s=0).status == "running"
    train_many(eager, root=tmp_path, data=cifar, device="cpu", pack=2)
    assert packs == [[6], [5]]  # a resumed eager run does not wait behind a new graph-stepped pack
