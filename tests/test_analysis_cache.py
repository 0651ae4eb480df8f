"""04's analyses are computed once per finished run and kept in its folder: a report of ResNet-110 reads them
back instead of spending hours of CPU, `resnet-lab analyse` fills them where training ran, and exports carry
them. A cached table must be exactly what a fresh computation returns, and never one of another model."""
from __future__ import annotations

import json
import shlex
import shutil

import pandas as pd
import pytest
import torch

from resnet_lab import cli, experiments as ex
from resnet_lab.config import make_config
from resnet_lab.runs import RunDir, load_runs
from resnet_lab.transfer import export_runs, import_runs, manifest

from .conftest import needs_data, smoke_04_grid

KW = dict(draws=1, eval_images=40, grad_samples=1, grad_batch=128, device="cpu")


@pytest.fixture
def trained(tmp_path, monkeypatch, cifar):
    """A smoke ResNet-8 and its plain twin, finished, in a fresh store."""
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    cfgs = ex.with_dataset([make_config("smoke", arch=a, depth=8) for a in ("resnet", "plain")])
    ex.train_all(cfgs, device="cpu", progress=False)
    return cfgs


def _no_model(monkeypatch):
    def refuse(self, device="cpu"):
        raise AssertionError(f"model of {self.cfg.name} loaded: the cache was not used")

    monkeypatch.setattr(RunDir, "load_model_and_sha256", refuse)


def _cached(cfgs):
    return sorted(p.name for c in cfgs for p in RunDir(c).path.glob("analysis-*.json"))


@needs_data
def test_a_cached_analysis_is_the_fresh_one_and_loads_no_model(trained, monkeypatch):
    fresh = ex.unravel_analysis(load_runs(), **KW)
    files = _cached(trained)
    assert len(files) == 2  # one per run: the plain net's lesion too
    rec = json.loads(RunDir(trained[0]).analysis_file("unravel", ex.unravel_params(1, 40, 1, 128)).read_text())
    assert rec["device"].startswith("cpu") and rec["params"]["revision"] == ex.UNRAVEL_REVISION
    assert set(rec["tables"]) == set(ex.UNRAVEL_COLUMNS)  # the residual run has every table
    with monkeypatch.context() as m:
        _no_model(m)
        cached = ex.unravel_analysis(load_runs(), **KW)
    assert set(cached) == set(fresh)
    for name in fresh:
        pd.testing.assert_frame_equal(cached[name], fresh[name], check_exact=True)
    assert len(fresh["lesion"]) == 2 * len(fresh["lesion"][fresh["lesion"]["arch"] == "plain"])
    # other settings are another analysis: computed, not read
    _no_model(monkeypatch)
    with pytest.raises(AssertionError, match="cache was not used"):
        ex.unravel_analysis(load_runs(), **{**KW, "draws": 2})


@needs_data
def test_a_changed_model_or_a_damaged_cache_is_computed_again(trained):
    ex.unravel_analysis(load_runs(), **KW)
    rd = RunDir(trained[0])
    f = rd.analysis_file("unravel", ex.unravel_params(1, 40, 1, 128))
    rec = json.loads(f.read_text())
    rec["tables"]["lesion"] = rec["tables"]["lesion"].replace("resnet", "forged")
    f.write_text(json.dumps(rec))
    assert (ex.unravel_analysis(load_runs(), **KW)["lesion"]["arch"] == "forged").any()  # same model: read back
    state = torch.load(rd.model_file, weights_only=True)  # the run's weights change (e.g. trained again)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, rd.model_file)
    t = ex.unravel_analysis(load_runs(), **KW)
    assert not (t["lesion"]["arch"] == "forged").any()
    assert json.loads(f.read_text())["model_sha256"] == rd.load_model_and_sha256()[1]
    f.write_text("{not json")
    assert ex.unravel_analysis(load_runs(), **KW)["lesion"].equals(t["lesion"])
    assert json.loads(f.read_text())["tables"]


@needs_data
def test_without_compute_missing_uncached_runs_are_left_out_and_named_with_the_command(trained, caplog):
    """What `report` asks: no hours of CPU behind the reader's back; the warning says what to run instead."""
    t = ex.unravel_analysis(load_runs(), **KW, compute_missing=False)
    assert all(df.empty for df in t.values()) and list(t["lesion"].columns) == list(
        ex.UNRAVEL_COLUMNS["lesion"] + ex.UNRAVEL_TAGS)
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 2 and all("resnet-lab analyse --notebook 04_unraveled_ensemble --preset smoke -p depth=8 "
                                    "-p 'seeds=[0]' -p draws=1 -p eval_images=40 -p grad_samples=1" in w for w in warned)
    assert _cached(trained) == []
    command = shlex.split(warned[0].split("Compute it with: ")[1])
    assert cli.main(command[1:] + ["--device", "cpu"]) == 0  # the command it gives caches what it reads
    t = ex.unravel_analysis(load_runs(), **KW, compute_missing=False)
    assert len(t["effective"]) == 1 and set(t["lesion"]["arch"]) == {"resnet", "plain"}


@needs_data
def test_analyse_command_caches_what_the_notebook_reads(trained, tmp_path, monkeypatch, capsys):
    grid = smoke_04_grid(tmp_path / "g.yaml", "8, 14")
    assert cli.main(["analyse", "--sweep", str(grid), "--device", "cpu"]) == 1  # resnet/plain-14: not trained
    out = capsys.readouterr().out
    assert "analysed 2 finished run(s): resnet-8, plain-8" in out and "no finished model in this store: resnet-14, plain-14" in out
    assert len(_cached(trained)) == 2
    _no_model(monkeypatch)  # the notebook's own call (grad_batch and data as it passes them) finds the cache
    nb = {**ex.notebook_defaults("04_unraveled_ensemble"), "draws": 1, "eval_images": 40, "grad_samples": 1}
    runs, _, missing = ex.collect(ex.unravel_configs("smoke", 8, [0], "resnet"))
    t = ex.unravel_analysis(runs, draws=nb["draws"], eval_images=nb["eval_images"], grad_samples=nb["grad_samples"],
                            device=nb["device"])
    assert not missing and set(t["lesion"]["net"]) == {"ResNet-8", "plain-8"}
    assert cli.main(["analyse", "--notebook", "04_unraveled_ensemble", "--preset", "smoke", "-p", "depth=8",
                     "-p", "draws=1", "-p", "eval_images=40", "-p", "grad_samples=1"]) == 0
    summary = RunDir(trained[1]).summary_file  # plain-8 diverged: finished, never analysed, not "to do"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "diverged"}))
    capsys.readouterr()
    assert cli.main(["analyse", "--notebook", "04_unraveled_ensemble", "--preset", "smoke", "-p", "depth=8",
                     "-p", "draws=1", "-p", "eval_images=40", "-p", "grad_samples=1"]) == 0
    out = capsys.readouterr().out
    assert "analysed 1 finished run(s): resnet-8; diverged (its tables leave it out): plain-8" in out, out


def test_analyse_refuses_what_it_cannot_do(capsys, tmp_path):
    def usage(*argv):
        with pytest.raises(SystemExit) as e:
            cli.main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "--sweep GRID" in usage("analyse")
    assert "04_unraveled_ensemble" in usage("analyse", "--notebook", "02_depth")
    assert "unknown" in usage("analyse", "--notebook", "99_nope")
    assert "no parameter(s) ['depths']" in usage("analyse", "--notebook", "04_unraveled_ensemble", "-p", "depths=[8]")
    grid = tmp_path / "g.yaml"
    grid.write_text("notebook: 04_unraveled_ensemble\npreset: smoke\nparameters:\n  depth: [8]\n")
    assert "-p/--param" in usage("analyse", "--sweep", str(grid), "-p", "depth=8")
    assert "--preset quick" in usage("analyse", "--sweep", str(grid), "--preset", "quick")


def _copy_store(root, cfgs, source_root):
    for c in cfgs:
        shutil.copytree(RunDir(c, source_root).path, RunDir(c, root).path)


@needs_data
def test_exports_carry_cached_analyses_and_imports_add_them_to_finished_runs(trained, tmp_path):
    gpu = tmp_path / "runs"
    ex.unravel_analysis(load_runs(), **KW)
    here = tmp_path / "here"
    _copy_store(here, trained, gpu)
    for c in trained:  # here: the same finished runs, trained and exported before the analysis existed
        for f in RunDir(c, here).path.glob("analysis-*.json"):
            f.unlink()
    have = manifest(here)
    assert all(v["analyses"] == [] for v in have.values())
    parts = export_runs(tmp_path / "out", root=gpu, skip=have)  # finished here, but analyses are new: they go
    result = import_runs(parts, root=here)
    assert set(result.values()) == {"kept local, 1 cached analysis file(s) added"}
    assert sorted(p.name for c in trained for p in RunDir(c, here).path.glob("analysis-*.json")) == _cached(trained)
    assert {h: v["analyses"] for h, v in manifest(here).items()} == {h: v["analyses"] for h, v in manifest(gpu).items()}
    assert import_runs(export_runs(tmp_path / "out2", root=gpu, skip=manifest(here)), root=here) == {}  # nothing new
    # a run this store lacks comes whole, its analyses included
    shutil.rmtree(RunDir(trained[0], here).path)
    import_runs(export_runs(tmp_path / "out3", root=gpu), root=here)
    assert len(list(RunDir(trained[0], here).path.glob("analysis-*.json"))) == 1


@needs_data
def test_the_gpu_session_path_train_analyse_export_import_report(tmp_path, monkeypatch, cifar):
    """The path paper results take: train and analyse there, export what is new, import here, and the notebook
    executed as `report` executes it (nothing trained, no analysis computed) shows every net's lesions."""
    import papermill as pm

    from .conftest import ROOT

    grid = smoke_04_grid(tmp_path / "g.yaml")
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(gpu))
    assert cli.main(["train", "--sweep", str(grid), "--quiet", "--device", "cpu"]) == 0
    assert cli.main(["analyse", "--sweep", str(grid), "--device", "cpu"]) == 0
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["runs", "manifest", str(tmp_path / "have.json")]) == 0
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(gpu))
    assert cli.main(["runs", "export", str(tmp_path / "out"), "--skip", str(tmp_path / "have.json"),
                     "--max-mb", "60"]) == 0
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["runs", "import", *map(str, sorted((tmp_path / "out").iterdir()))]) == 0
    out_nb = tmp_path / "04.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "04_unraveled_ensemble.ipynb"), str(out_nb), kernel_name="python3",
                        parameters=dict(preset="smoke", depth=8, draws=1, eval_images=40, grad_samples=1,
                                        train_missing=False, analyse_missing=False),
                        cwd=str(ROOT / "notebooks"), progress_bar=False)
    assert "left out" not in out_nb.read_text()
    lesion = pd.read_csv(here / "smoke" / "scratch" / "04_unraveled_ensemble" / "lesion.csv")
    assert set(lesion["net"]) == {"ResNet-8", "plain-8"}


@needs_data
def test_runs_finished_without_their_analysis_go_to_the_gpu_and_come_back_analysed(tmp_path, monkeypatch, cifar,
                                                                                    capsys, caplog):
    """A run that finished in a GPU call's last minutes comes back unanalysed (hours of CPU here): `runs export
    --to-analyse GRID` sends exactly those runs, weights and all, for the next session's `analyse` stage."""
    grid = smoke_04_grid(tmp_path / "g.yaml")
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["train", "--sweep", str(grid), "--quiet", "--device", "cpu"]) == 0
    other = make_config("smoke", depth=14, iterations=40)  # finished, but no point of the grid reads it
    ex.train_all([other], device="cpu", progress=False)
    send = lambda name, *more: cli.main(["runs", "export", str(tmp_path / name), "--name", "analyse",  # noqa: E731
                                         "--to-analyse", str(grid), *more])
    capsys.readouterr()
    assert send("in1") == 0
    assert "2 finished run(s) without the cached analyses" in capsys.readouterr().err
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(gpu))
    assert set(import_runs(sorted((tmp_path / "in1").iterdir())).values()) == {"imported"}
    assert len(manifest()) == 2 and all(v["weights"] and v["status"] == "done" for v in manifest().values())
    assert cli.main(["analyse", "--sweep", str(grid), "--device", "cpu"]) == 0
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    assert cli.main(["runs", "manifest", str(tmp_path / "have.json")]) == 0
    back = export_runs(tmp_path / "back", root=gpu / "runs", skip=json.loads((tmp_path / "have.json").read_text()))
    assert set(import_runs(back).values()) == {"kept local, 1 cached analysis file(s) added"}
    capsys.readouterr()
    assert send("in2") == 0 and "0 finished run(s)" in capsys.readouterr().err
    first = ex.configs_for("04_unraveled_ensemble", {**ex.notebook_defaults("04_unraveled_ensemble"), "preset": "smoke",
                                                     "depth": 8})[0]
    for f in RunDir(ex.with_dataset([first])[0]).path.glob("analysis-*.json"):
        f.unlink()  # this one's analysis only: it alone goes
    assert send("in3") == 0
    caplog.clear()
    assert send("in3b", "--max-mb", "0.01") == 1  # no room for it this time: it goes with a later export
    assert "goes to be analysed with an export that has more room" in caplog.text
    assert "bring the parts back" not in caplog.text  # the advice for a run too big to come back from a GPU
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "gpu2"))
    assert list(import_runs(sorted((tmp_path / "in3").iterdir()))) == [ex.with_dataset([first])[0].hash]
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(here))
    RunDir(ex.with_dataset([first])[0]).model_file.unlink()  # as a run restored from its record: no weights
    capsys.readouterr()
    caplog.clear()
    assert send("in4") == 0
    err = capsys.readouterr().err
    assert "0 finished run(s)" in err and "1 more without their weights too" in err and "0 run(s) in this" in err
    assert "model.pt is missing" not in caplog.text  # said once above, not warned about by the export
    for bad in (["--to-analyse", "sweeps/degradation.yaml"], ["--to-analyse", str(grid), "--unfinished"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["runs", "export", str(tmp_path / "x"), *bad])
        assert e.value.code == 2
    assert "01_degradation caches no analysis" in capsys.readouterr().err


@needs_data
def test_layer_responses_are_cached_per_run_and_recomputed_for_another_model(trained, monkeypatch):
    """06 passes every test image through every net; a report reads that back from the run folder instead, and a
    model.pt that changed (or other settings) computes it again."""
    from resnet_lab.analysis import layer_responses
    from resnet_lab.data import balanced_subset, eval_batches, load_cifar10

    runs = load_runs()
    fresh = ex.responses(runs, max_images=40)
    model = RunDir(trained[0]).load_model()
    data = load_cifar10()
    direct = layer_responses(model, eval_batches(*balanced_subset(data.test_x, data.test_y, 40)))
    mine = fresh[fresh["arch"] == "resnet"].reset_index(drop=True)
    assert mine["std"].tolist() == pytest.approx(direct["std"].tolist(), rel=1e-12)
    with monkeypatch.context() as m:
        _no_model(m)
        cached = ex.responses(runs, max_images=40)
    pd.testing.assert_frame_equal(fresh, cached)
    assert sum(p.name.startswith("analysis-responses-") for c in trained for p in RunDir(c).path.iterdir()) == 2
    assert len(ex.responses(runs, max_images=20)) == len(fresh)  # other settings: computed, not the 40-image table
    path = RunDir(trained[0]).model_file
    state = torch.load(path, weights_only=True)
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, path)
    again = ex.responses(runs, max_images=40)
    assert again[again["arch"] == "resnet"]["std"].tolist() != mine["std"].tolist()
