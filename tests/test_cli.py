"""`resnet-lab train`: every flag acts or is refused by name (exit code 2, one line); none is silently ignored."""
from __future__ import annotations

import dataclasses
import importlib
import re

import pytest

from resnet_lab import cli


@pytest.fixture
def no_training(monkeypatch):
    """Training here would be a bug: the command was meant to fail or to list."""
    ex = importlib.import_module("resnet_lab.experiments")
    tr = importlib.import_module("resnet_lab.train")  # the package exports a function of that name

    def boom(*a, **k):
        raise AssertionError("the command trained")

    monkeypatch.setattr(tr, "train", boom)
    monkeypatch.setattr(ex, "train_all", boom)


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_depth_0_is_refused_not_trained_as_20(no_training, capsys):
    err = _usage_error(capsys, "train", "--depth", "0", "--preset", "smoke")
    assert "depth=0" in err and "6n+2" in err


@pytest.mark.parametrize("argv, flag", [(["-p", "seeds=[1]"], "-p/--param"), (["--pack", "2"], "--pack"),
                                        (["--pack-mb", "30"], "--pack-mb"), (["--group"], "--group")])
def test_notebook_flags_without_notebook_are_refused(no_training, capsys, argv, flag):
    err = _usage_error(capsys, "train", "--preset", "smoke", *argv)
    assert flag in err and "--notebook" in err


def test_seed_with_notebook_says_to_use_the_seeds_parameter(no_training, capsys):
    err = _usage_error(capsys, "train", "--notebook", "01_degradation", "--preset", "smoke", "--seed", "1")
    assert "--seed" in err and "-p 'seeds=[1]'" in err


@pytest.mark.parametrize("argv, needles", [
    (["--notebook", "01_degradation", "-p", "train_missing=false"], ["train_missing", "would change nothing",
                                                                     "depths, seeds"]),
    (["--notebook", "04_unraveled_ensemble", "-p", "draws=3"], ["draws", "would change nothing `train` does"]),
    (["--notebook", "01_degradation", "-p", "seeds=[0,1]", "--group", "--pack", "1"], ["--group", "--pack 2"]),
    (["--set", "dataset=abc"], ["--set dataset", "RESNET_LAB_DATA"]),
    (["--list", "--time-budget", "5"], ["--list", "--time-budget"]),
    (["--notebook", "01_degradation", "--list", "--pack", "2"], ["--list", "--pack"]),
    (["--notebook", "01_degradation", "--pack", "0"], ["--pack 0", ">= 1"]),
    (["--notebook", "01_degradation", "--pack-mb", "0"], ["--pack-mb 0.0", "positive number of MiB"]),
    (["--notebook", "01_degradation", "--pack-mb", "nan"], ["--pack-mb nan", "positive number of MiB"]),
    (["--notebook", "01_degradation", "--list", "--pack-mb", "30"], ["--list", "--pack-mb"]),
    (["--time-budget", "0"], ["--time-budget 0", "> 0"]),
    (["--set", "lerning_rate=1"], ["lerning_rate", "allowed"]),
    # each listed as the default run, in a folder of its own (s25 review E9)
    (["--set", "warmup_err=5"], ["warmup_err=5", "a fraction in (0, 1]"]),
    (["--set", "warmup_err=0.5"], ["warmup_err=0.5", "means nothing without warmup_lr"]),
    (["--set", "milestones=[100000]"], ["milestones [100000] are not before iterations=6", "raise iterations"]),
])
def test_meaningless_or_bad_values_are_refused(no_training, capsys, argv, needles):
    err = _usage_error(capsys, "train", "--preset", "smoke", *argv)
    for n in needles:
        assert n in err, err


def test_an_unknown_notebook_is_one_message_from_the_api_and_the_cli(no_training, capsys):
    """notebook_defaults('99') raised a FileNotFoundError naming notebooks/99.ipynb; configs_for and
    `train --notebook` said which notebooks there are."""
    ex = importlib.import_module("resnet_lab.experiments")

    message = f"notebook '99' is unknown: use one of {sorted(ex.NOTEBOOK_CONFIGS)}"
    for call in (lambda: ex.notebook_defaults("99"), lambda: ex.configs_for("99", {})):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    assert _usage_error(capsys, "train", "--notebook", "99", "--list") == f"error: {message}"


def test_list_without_notebook_lists_the_one_run(no_training, capsys, tmp_path, monkeypatch):
    ex = importlib.import_module("resnet_lab.experiments")

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    assert cli.main(["train", "--preset", "smoke", "--depth", "14", "--seed", "3", "--list"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "resnet-14" in out[0] and "seed 3" in out[0] and "missing" in out[0], out


def test_a_presets_milestone_past_a_shorter_set_iterations_is_still_a_run(no_training, capsys, tmp_path,
                                                                           monkeypatch):
    """Only a milestone --set gives is refused past the end: a preset's schedule cut short by --set iterations
    (as experiments.CPU_1202 cuts smoke's, and README's `--preset paper --set iterations=32000`) stays a run."""
    ex = importlib.import_module("resnet_lab.experiments")

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    assert cli.main(["train", "--preset", "smoke", "--set", "iterations=2", "--list"]) == 0  # smoke's milestone: 4
    assert "step 0/2" in capsys.readouterr().out


GRID = "notebook: 01_degradation\npreset: smoke\nparameters:\n  depths: [[8], [14]]\n"


@pytest.mark.parametrize("argv, needles", [
    (["-p", "seeds=[1]"], ["-p/--param", "grid"]),
    (["--preset", "quick"], ["--preset quick", "preset smoke"]),
    (["--depth", "20"], ["--sweep", "--depth"]),
    (["--seed", "1"], ["--sweep", "--seed"]),
])
def test_sweep_flag_refuses_what_the_grid_sets(no_training, capsys, tmp_path, argv, needles):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    err = _usage_error(capsys, "train", "--sweep", str(grid), *argv)
    for n in needles:
        assert n in err, err


def test_sweep_flag_lists_every_runs_of_the_grid_once_and_notebooks_take_its_preset(no_training, capsys, tmp_path,
                                                                                   monkeypatch):
    ex = importlib.import_module("resnet_lab.experiments")

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    assert cli.main(["train", "--sweep", str(grid), "--sweep", str(grid), "--notebook", "06_layer_responses",
                     "-p", "depths=[8, 20]", "--list"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[1] for line in out]
    # the grid's 4 runs, then 06's plain/resnet-20 (its -8 ones are the grid's), all with the grid's smoke recipe
    assert names == ["plain-8", "resnet-8", "plain-14", "resnet-14", "plain-20", "resnet-20"], out
    assert all(line.endswith("step 0/6") for line in out), out
    assert _usage_error(capsys, "train", "--sweep", str(tmp_path / "nope.yaml"), "--list").count("does not exist")


def test_runs_manifest_and_export_skip_from_the_command_line(tmp_path, monkeypatch, capsys):
    import json

    from .test_transfer import HASH, make_run

    gpu, here = tmp_path / "gpu", tmp_path / "here"
    make_run(gpu / "runs", "aaa", "done", 100)
    make_run(gpu / "runs", "bbb", "done", 100)
    make_run(here / "runs", "aaa", "done", 100)
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["runs", "manifest", str(tmp_path / "have.json")]) == 0
    assert list(json.loads((tmp_path / "have.json").read_text())) == [HASH["aaa"]]
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(gpu))
    assert cli.main(["runs", "export", str(tmp_path / "out"), "--skip", str(tmp_path / "have.json"),
                     "--max-mb", "60"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["runs", "import", *map(str, sorted((tmp_path / "out").iterdir()))]) == 0
    assert capsys.readouterr().out.split() == [HASH["bbb"], "imported"]
    err = _usage_error(capsys, "runs", "export", str(tmp_path / "o"), "--skip", str(tmp_path / "nope.json"))
    assert "--skip" in err and "nope.json" in err


def test_train_sweep_tells_runs_the_time_budget_never_reached_from_failed_ones(capsys, tmp_path, monkeypatch):
    """After `--time-budget`, a run never started reads 'not started', a failed one 'failed', and a run stopped
    early shows no final error (not 0.00%); the exit code is 1 (not all done)."""
    from resnet_lab.runs import RunDir, atomic_write_json
    from resnet_lab.train import RunRecord

    ex = importlib.import_module("resnet_lab.experiments")
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])

    def train_all(cfgs, time_budget_s=None, **kw):  # what train_many gives when the budget ran out during run 1
        assert time_budget_s == 5 and len(cfgs) == 4 and kw["pack_mb"] == 30
        RunDir(cfgs[1]).path.mkdir(parents=True)
        atomic_write_json(RunDir(cfgs[1]).summary_file, {"status": "failed", "error": "RuntimeError: boom"})
        running = {"status": "running", "steps_done": 3, "final_train_err": None, "final_test_err": None,
                   "params": 1000, "wall_seconds": 5.0, "device": "cpu"}
        return [RunRecord(cfgs[0], RunDir(cfgs[0]).path, running, None), None, None, None]

    monkeypatch.setattr(ex, "train_all", train_all)
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    assert cli.main(["train", "--sweep", str(grid), "--time-budget", "5", "--quiet", "--device", "cpu",
                     "--pack-mb", "30"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "stopped (no checkpoint here: starts at step 0 when run again; 6 iterations in all) at step 3: train err -" \
        in out[0], out
    assert out[2].startswith("resnet-8 seed 0: failed (see ") and "summary.json" in out[2], out
    assert [line.split(": ", 1)[1] for line in out[3:]] == ["not started, --time-budget 5 s spent (run again to go on)"] * 2


@pytest.mark.parametrize("argv, needles", [
    (["train", "--preset", "smoke", "--device", "bogus"], ["--device 'bogus'", "auto, cpu, cuda or cuda:N"]),
    (["bench", "--device", "bogus"], ["--device 'bogus'", "cuda:N"]),
    (["analyse", "--notebook", "04_unraveled_ensemble", "--device", "gpu"], ["--device 'gpu'"]),
    (["train", "--preset", "smoke", "--device", "cuda"], ["--device cuda", "no CUDA device"]),
    (["train", "--preset", "smoke", "--set", "milestones=5"], ["milestones=5", "list of iteration numbers"]),
    (["train", "--set", "preset=paper"], ["--set preset", "--preset", "paper"]),
    (["train", "--notebook", "01_degradation", "-p", "preset=paper"], ["-p preset", "--preset"]),
    (["train", "--notebook", "01_degradation", "-p", "device=cpu"], ["-p device", "--device"]),
    (["analyse", "--notebook", "04_unraveled_ensemble", "-p", "device=cuda"], ["-p device", "--device"]),
])
def test_bad_devices_and_settings_are_one_line_errors(no_training, capsys, monkeypatch, tmp_path, argv, needles):
    import torch

    from resnet_lab import bench

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has no GPU, whatever runs it
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    err = _usage_error(capsys, *argv)
    assert all(n in err for n in needles), err
    assert not (tmp_path / "runs").exists()  # nothing stored, not even a failed run


@pytest.mark.parametrize("flags, needles", [
    (["--seconds", "nan"], ["--seconds nan", "finite number of seconds > 0"]),
    (["--seconds", "0"], ["--seconds 0.0", "> 0"]),
    (["--batch-size", "-5"], ["--batch-size -5", "positive integer"]),
    (["--num-workers", "-1"], ["--num-workers -1", ">= 0"]),
    (["--models", "8,21"], ["--models: depth=21", "8, 14, 20"]),
    (["--out", "FILE"], ["is not a folder"]),
])
def test_bad_bench_input_is_refused_before_it_measures_or_overwrites_anything(capsys, monkeypatch, tmp_path, flags,
                                                                               needles):
    """s25 audit E1-E5: NaN seconds looped forever, a negative batch ate the memory, a bad depth wrote rows of
    errors over the device's earlier bench; each is now a one-line error, exit 2, and the earlier files stay."""
    from resnet_lab import bench

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    (tmp_path / "bench").mkdir()
    earlier = tmp_path / "bench" / "cpu.json"
    earlier.write_text('{"rows": ["good"]}')
    monkeypatch.setattr("resnet_lab.data.load_cifar10", lambda *a, **k: pytest.fail("the data were loaded"))
    for f in ("_ours", "baseline_images_per_s"):
        monkeypatch.setattr(bench, f, lambda *a, **k: pytest.fail("the bench measured"))
    flags = [str(earlier) if f == "FILE" else f for f in flags]
    err = _usage_error(capsys, "bench", "--device", "cpu", "--models", "8", *flags)
    assert all(n in err for n in needles), err
    assert earlier.read_text() == '{"rows": ["good"]}' and sorted(p.name for p in (tmp_path / "bench").iterdir()) == [
        "cpu.json"]


def test_run_bench_refuses_bad_input_before_loading_the_data(tmp_path, monkeypatch):
    from resnet_lab import bench

    monkeypatch.setattr("resnet_lab.data.load_cifar10", lambda *a, **k: pytest.fail("the data were loaded"))

    for kw, needle in (({"seconds": float("nan")}, "--seconds nan"), ({"batch_size": 0}, "--batch-size 0"),
                       ({"models": [8, 9]}, "depth=9"), ({"packs": [0]}, "packs=[0]")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            bench.run_bench(**{"models": [8], **kw}, device="cpu", out=tmp_path, data=None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("param, needle", [("eval_images=-3", "eval_images=-3"), ("eval_images=10001", "10,000"),
                                           ("grad_samples=0", "grad_samples=0"), ("draws=-1", "draws=-1"),
                                           ("draws=two", "draws='two'")])
def test_analyse_refuses_bad_counts_before_loading_anything(no_training, capsys, monkeypatch, param, needle):
    ex = importlib.import_module("resnet_lab.experiments")
    monkeypatch.setattr(ex, "analyse_notebook", lambda *a, **k: pytest.fail("analysed"))
    err = _usage_error(capsys, "analyse", "--notebook", "04_unraveled_ensemble", "-p", param)
    assert needle in err and "positive integer" in err, err


@pytest.mark.parametrize("fixed, argv, device", [("cpu", [], "cpu"), ("cpu", ["--device", "cpu"], "cpu"),
                                                 ("auto", ["--device", "cpu"], "cpu"), (None, [], "auto")])
def test_train_sweep_uses_the_grids_device(capsys, tmp_path, monkeypatch, fixed, argv, device):
    """A grid's `fixed: device:` is honoured by train --sweep (with --device auto), as `sweep` honours it."""
    ex = importlib.import_module("resnet_lab.experiments")
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    seen = []
    monkeypatch.setattr(ex, "train_all", lambda cfgs, device=None, **kw: seen.append(device) or [])
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID + (f"fixed:\n  device: {fixed}\n" if fixed else ""))
    cli.main(["train", "--sweep", str(grid), "--quiet", *argv])
    assert seen == [device]


def test_train_sweep_refuses_a_device_the_grid_contradicts(no_training, capsys, tmp_path):
    grid, other = tmp_path / "g.yaml", tmp_path / "h.yaml"
    grid.write_text(GRID + "fixed:\n  device: cpu\n")
    other.write_text(GRID + "fixed:\n  device: cuda\n")
    err = _usage_error(capsys, "train", "--sweep", str(grid), "--device", "cuda:0", "--list")
    assert f"{grid} sets device cpu but --device is cuda:0" in err and "auto" in err, err
    err = _usage_error(capsys, "train", "--sweep", str(grid), "--sweep", str(other), "--list")
    assert "sets device cpu" in err and "sets device cuda" in err, err
    bad = tmp_path / "bad.yaml"
    bad.write_text(GRID + "fixed:\n  device: gpu0\n")
    assert "sets device 'gpu0' is not valid" in _usage_error(capsys, "train", "--sweep", str(bad), "--list")


def test_cuda_and_cuda_0_are_one_device(capsys, tmp_path, monkeypatch):
    ex = importlib.import_module("resnet_lab.experiments")
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID + "fixed:\n  device: cuda\n")
    assert cli.main(["train", "--sweep", str(grid), "--device", "cuda:0", "--list"]) == 0  # not a clash


def test_list_on_a_store_it_cannot_lock_shows_the_stored_status(tmp_path, monkeypatch):
    """`train --list` tries each unfinished run's lock to say running or stopped; a read-only store says what
    is on disk instead of failing."""
    from resnet_lab import runs as R
    from resnet_lab.config import make_config

    rd = R.RunDir(make_config("smoke", depth=8), tmp_path)
    rd.path.mkdir(parents=True)
    rd.summary_file.write_text('{"status": "running", "steps_done": 3}')

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(R, "lock_run", read_only)
    assert rd.live_status() == "running"


def test_ctrl_c_during_train_exits_130_in_one_line(capsys, monkeypatch):
    tr = importlib.import_module("resnet_lab.train")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "train", interrupted)
    assert cli.main(["train", "--preset", "smoke", "--device", "cpu"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "resumes" in err and "\n" not in err, err


def test_runs_commands_refuse_bad_paths_and_count_what_they_left_out(tmp_path, monkeypatch, capsys):
    """A path argument that is missing, a folder or a file in the way is bad input (2); a run left out (held by a
    trainer, or over --max-mb on its own) is something not done (1), with the output naming it."""
    from resnet_lab.runs import lock_run

    from .test_transfer import HASH, make_run

    store = tmp_path / "store"
    make_run(store / "runs", "aaa", "done", 100)
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(store))
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _usage_error(capsys, "runs", "export", str(tmp_path / "file"))
    assert "cannot be a manifest file" in _usage_error(capsys, "runs", "manifest", str(tmp_path))
    missing = tmp_path / "nope" / "runs.tar.gz.000"
    assert str(missing) in _usage_error(capsys, "runs", "import", str(missing))
    (tmp_path / "dir.tar.gz.000").mkdir()
    assert "dir.tar.gz.000" in _usage_error(capsys, "runs", "import", str(tmp_path / "dir.tar.gz.000"))

    assert cli.main(["runs", "export", str(tmp_path / "tiny"), "--max-mb", "0.0001"]) == 1
    out, err = capsys.readouterr()
    assert "over --max-mb 0.0001 on its own" in err and HASH["aaa"] in err
    assert cli.main(["runs", "export", str(tmp_path / "out")]) == 0
    parts = sorted(map(str, (tmp_path / "out").iterdir()))
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "here"))
    local = make_run(tmp_path / "here" / "runs", "aaa", "running", 3)
    with lock_run(local):  # a trainer holds it (flock: per open file, so this process's import too)
        assert cli.main(["runs", "import", *parts]) == 1
    assert "skipped" in capsys.readouterr().out
    assert cli.main(["runs", "import", *parts]) == 0


def test_runs_import_of_a_folder_without_records_is_refused_naming_the_parts_it_holds(tmp_path, monkeypatch,
                                                                                       capsys):
    """`runs import <folder>` of the folder an export wrote its parts into imported nothing and exited 0: the user
    meant the parts, and the message says what to pass instead (an empty records folder stays exit 0: see
    test_records.test_runs_import_takes_a_folder_of_records)."""
    from .test_transfer import make_run

    make_run(tmp_path / "store" / "runs", "aaa", "done", 100)
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "store"))
    assert cli.main(["runs", "export", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "here"))
    err = _usage_error(capsys, "runs", "import", str(tmp_path / "out"))
    assert err == (f"error: {tmp_path / 'out'} holds export parts, not run records: pass them: "
                   f"resnet-lab runs import {tmp_path / 'out'}/runs.tar.gz.*")
    assert not (tmp_path / "here").exists()


@pytest.mark.usefixtures("cifar")  # it skips without a CIFAR-10 copy
def test_a_run_store_that_cannot_be_written_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """The disk, not the input: exit 1 with the run and the place named, no traceback."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "file"))  # a file where the store's folder would be
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "smoke", "--depth", "8", "--device", "cpu", "--quiet"])
    assert e.value.code != 0 and str(e.value.code).startswith("error: cannot write run ")  # exit 1, the line
    assert str(tmp_path / "file" / "runs") in e.value.code and "\n" not in e.value.code
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.usefixtures("cifar")  # it skips without a CIFAR-10 copy
def test_a_diverged_run_is_a_result_and_a_stopped_one_without_checkpoint_says_it_restarts(tmp_path, monkeypatch,
                                                                                           capsys):
    """`train` exits 0 for a diverged run (a result: trained again it diverges again; `analyse` agrees), and
    `--list` does not promise a resume to a run whose progress came without its checkpoint."""
    from resnet_lab import experiments as ex
    from resnet_lab.config import make_config
    from resnet_lab.runs import RunDir, atomic_write_json

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    diverged, stopped = ex.with_dataset([make_config("smoke", depth=8), make_config("smoke", depth=8, seed=1)])
    for c, status in ((diverged, "diverged"), (stopped, "running")):
        RunDir(c).path.mkdir(parents=True)
        atomic_write_json(RunDir(c).config_file, {**c.to_json(), "hash": c.hash})
        atomic_write_json(RunDir(c).summary_file, {"status": status, "steps_done": 3, "params": 1, "device": "x",
                                                    "wall_seconds": 1.0})
    assert cli.main(["train", "--preset", "smoke", "--depth", "8", "--device", "cpu", "--quiet"]) == 0
    assert "diverged at step 3" in capsys.readouterr().out
    assert cli.main(["train", "--preset", "smoke", "--depth", "8", "--seed", "1", "--list"]) == 0
    assert "stopped  step 3/6  (no checkpoint here: it starts again at step 0)" in capsys.readouterr().out


def test_a_grid_takes_speed_only_settings_for_every_run_and_refuses_the_rest(capsys, tmp_path, monkeypatch):
    """`train --sweep G --set compile=true`: the same runs (same hashes, so they resume and skip as before),
    each trained with the setting; a field that would change the runs is refused, naming what is allowed."""
    ex = importlib.import_module("resnet_lab.experiments")
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    seen = []
    monkeypatch.setattr(ex, "train_all", lambda cfgs, **kw: seen.append(cfgs) or [])
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    cli.main(["train", "--sweep", str(grid), "--quiet", "--device", "cpu"])
    cli.main(["train", "--sweep", str(grid), "--quiet", "--device", "cpu", "--set", "compile=true", "--set", "fast=false"])
    plain, speed = seen
    assert [c.hash for c in speed] == [c.hash for c in plain] and len(plain) == 4
    assert all(c.compile and not c.fast for c in speed) and not any(c.compile for c in plain)
    for argv in (["--sweep", str(grid)], ["--notebook", "01_degradation"]):
        err = _usage_error(capsys, "train", *argv, "--set", "lr=0.2", "--list")
        assert "--set lr would change the runs" in err and "'compile'" in err and "'activation_checkpointing'" in err


def test_one_run_finished_in_a_skip_manifest_is_not_trained_again(no_training, capsys, tmp_path, monkeypatch):
    """`train --skip MANIFEST` of one net (the fidelity run of a GPU session): a fresh machine does not redo a
    run the manifest has finished, and trains one it has only started (the no_training fixture fails it)."""
    import json

    ex = importlib.import_module("resnet_lab.experiments")
    from resnet_lab.config import make_config

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(ex, "with_dataset", lambda cfgs: [dataclasses.replace(c, dataset="test") for c in cfgs])
    cfg = ex.with_dataset([make_config("smoke", depth=8, precision="fp32")])[0]
    have = tmp_path / "have.json"
    argv = ["train", "--preset", "smoke", "--depth", "8", "--set", "precision=fp32", "--device", "cpu",
            "--quiet", "--skip", str(have)]
    have.write_text(json.dumps({cfg.hash: {"status": "done", "steps_done": 6, "analyses": []}}))
    assert cli.main(argv) == 0
    assert "resnet-8 fp32 seed 0: done in" in capsys.readouterr().out
    assert cli.main([*argv, "--list"]) == 0
    assert "not trained here" in capsys.readouterr().out
    have.write_text(json.dumps({cfg.hash: {"status": "running", "steps_done": 3, "analyses": []}}))
    with pytest.raises(AssertionError, match="the command trained"):
        cli.main(argv)
    err = _usage_error(capsys, *argv[:-1], str(tmp_path / "nope.json"))
    assert "--skip" in err and "nope.json" in err


def test_analyse_takes_its_settings_refuses_the_rest_and_says_what_it_skips(no_training, capsys, tmp_path,
                                                                            monkeypatch):
    ex = importlib.import_module("resnet_lab.experiments")
    seen = []
    monkeypatch.setattr(ex, "analyse_notebook", lambda nb, p, device=None: seen.append((nb, p)) or ([], [], []))
    err = _usage_error(capsys, "analyse", "--notebook", "04_unraveled_ensemble", "--preset", "smoke", "-p",
                       "analyse_missing=false")
    assert "analyse_missing" in err and "draws, eval_images, grad_samples" in err
    err = _usage_error(capsys, "analyse", "--notebook", "04_unraveled_ensemble", "--preset", "smoke", "-p",
                       "draws=-5")
    assert "draws=-5" in err
    assert cli.main(["analyse", "--notebook", "04_unraveled_ensemble", "-p", "draws=2", "--preset", "smoke",
                     "--device", "cpu"]) == 0
    assert seen[0][1]["draws"] == 2
    assert cli.main(["analyse", "--notebook", "04_unraveled_ensemble", "--notebook", "01_degradation", "--preset",
                     "smoke", "--device", "cpu"]) == 0
    assert "01_degradation: caches no analysis" in capsys.readouterr().out and len(seen) == 2


def test_a_failed_run_reached_by_no_sitting_prints_its_error_not_a_traceback(capsys, tmp_path):
    """`train --notebook ... --time-budget` lists the runs the budget never reached with their stored
    record; a failed one has no metrics (params, errors) to show."""
    import pandas as pd

    from resnet_lab.config import make_config
    from resnet_lab.train import RunRecord

    rec = RunRecord(make_config("smoke", depth=8), tmp_path, {"status": "failed", "error": "RuntimeError: boom"},
                    pd.DataFrame())
    cli._print_run(rec)
    assert capsys.readouterr().out.startswith("resnet-8 seed 0: failed (RuntimeError: boom; see ")
    cli._print_run(RunRecord(rec.config, tmp_path, {"status": "locked"}, pd.DataFrame()))  # held elsewhere
    assert capsys.readouterr().out == "resnet-8 seed 0: held by another process (a trainer or an import): left to it\n"


@pytest.mark.parametrize("argv, needles", [
    (["train", "--arch", "foo"], ["--arch: invalid choice: 'foo'", "'plain'", "resnet-lab train --help"]),
    (["train", "--depth", "abc"], ["--depth: invalid int value: 'abc'"]),
    (["nope"], ["invalid choice: 'nope'", "'train'"]),
])
def test_argparses_own_errors_are_one_line_too(capsys, argv, needles):
    """s25 audit E13: an unknown choice printed the whole usage (8 lines) under argparse's own prefix."""
    err = _usage_error(capsys, *argv)
    assert all(n in err for n in needles), err


def test_a_manifest_that_cannot_be_written_names_the_path_given(tmp_path, monkeypatch, capsys):
    """s25 audit E13: the error named the temp file written beside it ('/proc/.x.json.dzwky0rt.tmp')."""
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["runs", "manifest", "/proc/x.json"])  # /proc takes no new files, root or not
    assert str(e.value) == "error: cannot write the manifest '/proc/x.json': No such file or directory"


def test_a_notebook_value_given_twice_is_refused_as_a_grid_refuses_it(capsys):
    """s25 audit E12: -p 'seeds=[0,0]' trained seed 0 once and said nothing; a grid refused the same list."""
    err = _usage_error(capsys, "train", "--notebook", "02_depth", "-p", "seeds=[0,0]", "--list")
    assert err == "error: seeds lists 0 twice: each value once"


@pytest.mark.usefixtures("cifar")  # with_dataset reads the copy's id
def test_a_notebook_that_trains_nothing_says_so(capsys):
    """s25 audit E12: `train --notebook 07_imagenet_architectures --list` printed an empty line."""
    assert cli.main(["train", "--notebook", "07_imagenet_architectures", "--list"]) == 0
    assert capsys.readouterr().err.strip().endswith("no runs: 07_imagenet_architectures trains none")


def test_an_empty_data_source_is_refused_not_read_as_the_current_folder(capsys):
    """s25 audit E13: `data info --source ''` reported the current folder's missing train/<class> images."""
    assert _usage_error(capsys, "data", "info", "--source", "") == (
        "error: --source '' is empty: give a CIFAR-10 archive, folder or tarball, or leave it out")
