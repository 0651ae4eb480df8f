"""Run records: the small files of the runs behind a preset's committed tables travel with the repository, so a
clone (or the next GPU session's machine) redraws them. The store itself is git-ignored; a machine that goes
away took the paper runs' records with it once."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from resnet_lab import cli, records, report
from resnet_lab import experiments as ex
from resnet_lab.config import make_config
from resnet_lab.runs import RunDir, load_runs

from .conftest import needs_data

CFGS = [make_config("smoke", seed=i) for i in range(3)]
H = [c.hash for c in CFGS]


def _run(store, cfg, status, steps, weights=True):
    d = store / cfg.hash
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": steps}))
    (d / "metrics.csv").write_text(f"step,test_err\n{steps},0.5\n")
    (d / "checkpoint.pt").write_bytes(b"ckpt")
    (d / ".lock").write_text("")
    if status == "done" and weights:
        (d / "model.pt").write_bytes(b"weights")
    return d


def _executed(results, preset, name, runs):
    nb = results / preset / "executed" / f"{name}.ipynb"
    nb.parent.mkdir(parents=True, exist_ok=True)
    nb.write_text(json.dumps({"metadata": {records.RECORD: {"runs": runs}}}))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    return tmp_path


def test_save_keeps_the_small_files_of_the_runs_drawn_and_restore_puts_them_back(home):
    store = home / "runs"
    done = _run(store, CFGS[0], "done", 8)
    rd = RunDir(CFGS[0])
    rd.write_analysis("responses", {"n": 1}, {"t": pd.DataFrame({"std": [0.25]})}, "sha-of-weights")
    _run(store, CFGS[1], "running", 4)  # 05 draws runs stopped part-way: its curve is a record too
    _run(store, CFGS[2], "done", 8)  # no notebook drew it
    _executed(home, "smoke", "01_degradation", [H[0]])
    _executed(home, "smoke", "05_thousand_layers", [H[1], "not-a-hash/.."])
    stale = records.records_dir("smoke") / ("f" * 12)
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    assert records.save("smoke") == 3  # two written, one stale removed
    rec = records.records_dir("smoke")
    assert sorted(p.name for p in rec.iterdir()) == sorted(H[:2])
    assert sorted(p.name for p in (rec / H[0]).iterdir()) == sorted(
        ["config.json", "metrics.csv", "summary.json", rd.analysis_file("responses", {"n": 1}).name])
    assert sorted(p.name for p in (rec / H[1]).iterdir()) == ["config.json", "metrics.csv", "summary.json"]
    mtime = (rec / H[0] / "metrics.csv").stat().st_mtime_ns
    assert records.save("smoke") == 0 and (rec / H[0] / "metrics.csv").stat().st_mtime_ns == mtime  # git stays quiet
    (done / "metrics.csv").write_text("step,test_err\n8,0.4\n")
    assert records.save("smoke") == 1 and "0.4" in (rec / H[0] / "metrics.csv").read_text()

    # a fresh machine: no store at all
    for p in sorted(store.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    store.rmdir()
    assert records.restore(rec) == {H[0]: "imported", H[1]: "imported"}
    runs = load_runs().set_index("hash")
    assert runs.loc[H[0], "status"] == "done" and runs.loc[H[1], "status"] == "running"
    assert not rd.model_file.exists() and not (store / H[1] / "checkpoint.pt").exists()
    # the cached tables are all there is of the weights: read, not refused for a model.pt it cannot compare
    assert rd.read_analysis("responses", {"n": 1})["t"]["std"].tolist() == [0.25]
    with pytest.raises(FileNotFoundError, match="restored from its record"):
        rd.load_model()
    assert records.save("smoke") == 0  # what came back is what went


def test_restore_keeps_a_copy_further_along_and_passes_over_a_bad_record(home, caplog):
    store, rec = home / "runs", records.records_dir("smoke")
    _run(rec, CFGS[0], "running", 4, weights=False)
    _run(rec, CFGS[1], "done", 8, weights=False)
    (rec / H[2]).mkdir()
    (rec / H[2] / "config.json").write_text(json.dumps(CFGS[0].to_json()))  # hashes to another folder
    _run(store, CFGS[0], "running", 6)  # further along, with a checkpoint: it resumes
    got = records.restore(rec)
    assert got[H[0]].startswith("kept local") and got[H[1]] == "imported"
    assert got[H[2]].startswith("not restored") and H[2] in caplog.text
    assert json.loads((store / H[0] / "summary.json").read_text())["steps_done"] == 6
    assert records.restore(home / "nowhere") == {}


def test_runs_import_takes_a_folder_of_records(home, capsys):
    rec = records.records_dir("smoke")
    _run(rec, CFGS[0], "done", 8, weights=False)
    assert cli.main(["runs", "import", str(rec)]) == 0
    assert f"{H[0]} imported" in capsys.readouterr().out
    assert load_runs()["hash"].tolist() == [H[0]]
    (home / "empty").mkdir()
    assert cli.main(["runs", "import", str(home / "empty")]) == 0
    assert "no run records in" in capsys.readouterr().err


def test_a_report_draws_from_the_records_and_writes_them_back(home, monkeypatch):
    """A clone's `report`: the committed records go into the store before any notebook runs, so nothing is
    `kept` for runs the store lacks, and the records of what was drawn are written after."""
    import papermill as pm

    rec = records.records_dir("smoke")
    _run(rec, CFGS[0], "done", 8, weights=False)
    _run(rec, CFGS[1], "done", 8, weights=False)
    tables = home / "smoke" / "01_degradation"
    tables.mkdir(parents=True)
    (tables / "rows.csv").write_text("run\n1\n")
    _executed(home, "smoke", "01_degradation", H[:2])
    seen = []

    def fake(src, out, parameters, **kw):
        seen.append(sorted(load_runs()["hash"]))
        with open(out, "w") as f:
            f.write('{"metadata": {}}')

    monkeypatch.setattr(pm, "execute_notebook", fake)
    monkeypatch.setattr(report, "_runs_drawn", lambda name, params: (sorted(load_runs()["hash"]), 2))
    status = report.build("smoke", only=["01_degradation"], kernel="python3")
    assert status["status"].tolist() == ["done"] and seen == [sorted(H[:2])]
    assert sorted(p.name for p in rec.iterdir()) == sorted(H[:2])
    assert sorted(p.name for p in (rec / H[0]).iterdir()) == ["config.json", "metrics.csv", "summary.json"]


@needs_data
def test_highway_gates_are_cached_like_the_responses(home, cifar):
    """03's gate figure reads a cached table, so a run restored from its record (no weights) still draws."""
    cfg = ex.with_dataset([make_config("smoke", arch="highway", depth=8)])
    ex.train_all(cfg, device="cpu", progress=False)
    runs = load_runs()
    fresh = ex.highway_gates(runs, max_images=40)
    os.unlink(RunDir(cfg[0]).model_file)
    pd.testing.assert_frame_equal(ex.highway_gates(runs, max_images=40), fresh)
    with pytest.raises(FileNotFoundError, match="restored from its record"):
        ex.highway_gates(runs, max_images=20)  # other settings need the weights


def test_a_record_never_costs_a_local_copy_its_weights_or_checkpoint(home):
    """A record has no weights: it must not replace a finished local copy that has them (even one claiming more
    steps) nor a partial copy that resumes; an export of the run with its weights replaces a restored one."""
    from resnet_lab.transfer import export_runs, import_runs, manifest

    store, rec = home / "runs", records.records_dir("smoke")
    _run(rec, CFGS[0], "done", 9, weights=False)
    _run(rec, CFGS[1], "done", 8, weights=False)
    _run(store, CFGS[0], "done", 8)  # weights
    _run(store, CFGS[1], "running", 4)  # a checkpoint
    got = records.restore(rec)
    assert all(got[h].startswith("kept local: it has its weights or a checkpoint") for h in H[:2])
    assert (store / H[0] / "model.pt").read_bytes() == b"weights" and (store / H[1] / "checkpoint.pt").exists()

    elsewhere = home / "elsewhere"
    _run(elsewhere / "runs", CFGS[2], "done", 8)
    (store / H[2]).mkdir()
    for name in ("config.json", "summary.json", "metrics.csv"):  # restored from a record: no weights
        (store / H[2] / name).write_bytes((elsewhere / "runs" / H[2] / name).read_bytes())
    assert manifest()[H[2]]["weights"] is False and manifest()[H[0]]["weights"] is True
    parts = export_runs(home / "out", root=elsewhere / "runs", skip=manifest())
    assert parts.runs == [H[2]]  # the manifest's copy has no weights: this one goes
    assert import_runs(parts)[H[2]] == "imported: it brings the weights the local copy lacked"
    assert (store / H[2] / "model.pt").read_bytes() == b"weights"


def test_save_writes_through_no_link_skips_a_held_run_and_prunes_only_a_complete_record(home, tmp_path):
    from resnet_lab.runs import lock_run

    store, rec = home / "runs", records.records_dir("smoke")
    for c in CFGS:
        _run(store, c, "done", 8)
    _executed(home, "smoke", "01_degradation", H)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("secret")
    rec.mkdir(parents=True)
    (rec / H[0]).symlink_to(outside)
    with lock_run(store / H[1]):  # a trainer (or an import) holds it: its record waits for the next report
        records.save("smoke")
    assert sorted(p.name for p in outside.iterdir()) == ["id_rsa"]
    assert not (rec / H[1]).exists() and (rec / H[2] / "summary.json").exists()
    assert H[0] not in records.restore(rec)  # a linked record is not read either
    (rec / H[0]).unlink()

    records.save("smoke")
    assert sorted(p.name for p in rec.iterdir()) == sorted(H)
    _executed(home, "smoke", "02_depth", H[:1])
    (home / "smoke" / "executed" / "01_degradation.ipynb").write_text('{"metadata": {}}')  # papermill by hand
    records.save("smoke")
    assert sorted(p.name for p in rec.iterdir()) == sorted(H)  # it may have drawn any of them: none pruned
    _executed(home, "smoke", "01_degradation", H[:2])
    records.save("smoke")
    assert sorted(p.name for p in rec.iterdir()) == sorted(H[:2])


def test_runs_import_of_records_exits_1_for_one_it_could_not_restore(home, capsys):
    rec = records.records_dir("smoke")
    (rec / H[0]).mkdir(parents=True)
    (rec / H[0]).joinpath("config.json").write_text(json.dumps(CFGS[1].to_json()))  # hashes to another folder
    assert cli.main(["runs", "import", str(rec)]) == 1
    assert f"{H[0]} not restored" in capsys.readouterr().out


def test_an_executed_notebook_that_reads_no_runs_does_not_stop_pruning(home):
    """07 times untrained nets: it records no runs, and `make reproduce` executes it beside the others, so it
    must not make every old record look possibly drawn (it kept 24 stale records once)."""
    store, rec = home / "runs", records.records_dir("smoke")
    for c in CFGS:
        _run(store, c, "done", 8)
    _executed(home, "smoke", "01_degradation", H)
    records.save("smoke")
    (home / "smoke" / "executed" / "07_imagenet_architectures.ipynb").write_text('{"metadata": {}}')
    _executed(home, "smoke", "01_degradation", H[:1])
    records.save("smoke")
    assert sorted(p.name for p in rec.iterdir()) == H[:1]
    assert ex.configs_for("07_imagenet_architectures", {"preset": "smoke"}) == []  # what READS_NO_RUNS says
    assert all(ex.configs_for(nb, {"preset": "smoke"}) for nb in set(ex.NOTEBOOK_CONFIGS) - ex.READS_NO_RUNS)


def test_floats_a_run_writes_to_csv_come_back_bit_for_bit(tmp_path, monkeypatch):
    """A resumed run rewrites its earlier metric rows from what it reads back, and cached analyses are tables
    read back from CSV text: pandas 2 (the GPU machine's may be) reads about one float in five 1 ulp off
    unless asked for round-trip parsing, an argument pandas 3 deprecates."""
    import io
    import warnings

    import numpy as np

    from resnet_lab.runs import _read_metrics, atomic_write_csv, read_csv

    x = np.random.default_rng(0).lognormal(0, 2, 5000)
    atomic_write_csv(pd.DataFrame({"step": range(len(x)), "test_loss": x}), tmp_path / "metrics.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation either
        back = _read_metrics(tmp_path / "metrics.csv")["test_loss"].to_numpy()
    assert back.dtype == np.float64 and (back == x).all(), int((back != x).sum())
    asked = []
    monkeypatch.setattr(pd, "read_csv", lambda src, **kw: asked.append(kw))
    for version in ("2.2.3", "3.0.0", "10.1"):
        monkeypatch.setattr(pd, "__version__", version)
        read_csv(io.StringIO("x\n1.5\n"))
    assert asked == [{"float_precision": "round_trip"}, {}, {}]
