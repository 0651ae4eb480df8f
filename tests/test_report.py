"""`report` rebuilds figures from stored runs and trains nothing."""
import json
import os
from pathlib import Path

import pytest

from .conftest import ROOT, needs_data


def _snapshot(d: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@needs_data
def test_report_regenerates_figures_without_training(tmp_path, monkeypatch):
    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    executed = tmp_path / "smoke" / "executed"
    executed.mkdir(parents=True)
    pm.execute_notebook(str(ROOT / "notebooks" / "01_degradation.ipynb"), str(executed / "01_degradation.ipynb"),
                        parameters={"preset": "smoke", "depths": [8]}, kernel_name="python3", progress_bar=False)
    fig = tmp_path / "smoke" / "01_degradation" / "degradation.png"
    assert (tmp_path / "smoke" / "scratch" / "01_degradation" / "degradation.png").exists()  # run by hand
    assert not fig.exists()  # the committed folder is the report's
    before = _snapshot(tmp_path / "runs")
    status = report.build("smoke", only=["01_degradation"], kernel="python3")
    assert status["status"].tolist() == ["done"]
    assert fig.exists(), "the figure was not rebuilt"
    assert _snapshot(tmp_path / "runs") == before, "report touched the run store"
    assert report.executed_parameters(executed / "01_degradation.ipynb")["depths"] == [8]
    import json  # the path papermill records is the kept notebook's, not the hidden one it executed into

    meta = json.loads((executed / "01_degradation.ipynb").read_text())["metadata"]["papermill"]
    assert meta["output_path"] == str(executed / "01_degradation.ipynb")
    assert set(report.outputs("smoke")["name"]) >= {"table", "degradation"}


def test_report_bad_input():
    from resnet_lab import report

    with pytest.raises(ValueError, match="preset='huge'.*paper"):
        report.build("huge")
    with pytest.raises(ValueError, match="unknown notebook.*99_nothing.*01_degradation"):
        report.build("smoke", only=["99_nothing"])


def test_report_refuses_an_unknown_kernel_before_any_notebook_runs(tmp_path, monkeypatch, capsys):
    """`report --kernel nope` printed a traceback per notebook, wrote a .failed.ipynb for each and rewrote the
    claims: a kernel not found is bad input (exit 2, one line naming the kernels there), and nothing is touched."""
    from resnet_lab import cli

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--preset", "smoke", "--only", "02_depth", "--kernel", "nope"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: --kernel 'nope' is not a Jupyter kernel here: use one of [") and "'python3'" in err
    assert "make install registers resnet-lab" in err
    assert not (tmp_path / "smoke").exists()


def test_report_kernel_gets_absolute_data_and_results_paths(tmp_path, monkeypatch):
    """papermill starts the kernel in notebooks/: relative paths (README: RESNET_LAB_DATA=../shared/...) must be
    made absolute against the caller's cwd while it runs, and os.environ restored afterwards."""
    import os

    import papermill as pm

    from resnet_lab import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESNET_LAB_DATA", "../shared/data/cifar10-jpeg.tar.gz")
    monkeypatch.setenv("RESNET_LAB_RESULTS", "results")
    seen = {}

    def fake_execute(input_path, output_path, **kw):
        seen.update({k: os.environ.get(k) for k in ("RESNET_LAB_DATA", "RESNET_LAB_RESULTS")})
        Path(output_path).write_text("{}")

    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    table = report.build("smoke", only=["01_degradation"], kernel="python3")
    assert table["status"].tolist() == ["done"]
    assert seen["RESNET_LAB_DATA"] == str(tmp_path / "../shared/data/cifar10-jpeg.tar.gz")
    assert seen["RESNET_LAB_RESULTS"] == str(tmp_path / "results")
    assert (tmp_path / "results" / "smoke" / "executed" / "01_degradation.ipynb").exists()
    assert os.environ["RESNET_LAB_DATA"] == "../shared/data/cifar10-jpeg.tar.gz"
    assert os.environ["RESNET_LAB_RESULTS"] == "results"


def test_report_executes_with_the_grids_report_parameters(tmp_path, monkeypatch):
    """The paper grids' `report:` sections say which seeds and depths make the combined tables (Table 6 over
    3 seeds, not the notebook's default one); a notebook without one keeps its last parameters."""
    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    seen = {}
    def fake_execute(src, out, parameters, **kw):
        seen.setdefault(Path(src).stem, parameters)
        Path(out).write_text("{}")

    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    table = report.build("paper", only=["02_depth", "04_unraveled_ensemble", "05_thousand_layers"], kernel="python3")
    assert table["status"].tolist() == ["done", "done", "done"]
    assert seen["04_unraveled_ensemble"] == {"preset": "paper", "depth": 110, "arch": "preact", "grad_samples": 100,
                                             "train_missing": False, "analyse_missing": False}  # hours on a CPU
    assert seen["02_depth"] == {"preset": "paper", "depths": [20, 32, 44, 56, 110], "seeds": [0, 1, 2],
                                "train_missing": False}
    assert seen["05_thousand_layers"] == {"preset": "paper", "train_missing": False}


def test_a_failed_report_keeps_the_last_good_execution(tmp_path, monkeypatch, caplog):
    """papermill writes its output as it runs: a failed execution must not replace the last good one. It is kept
    beside it as <name>.failed.ipynb (its error cell is the log) until a later execution runs clean. The tables
    and figures the notebook wrote before it failed are put back as they were, so the claims read the last good
    execution's tables."""
    import json

    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    executed, tables = tmp_path / "smoke" / "executed", tmp_path / "smoke" / "01_degradation"
    good, failed = executed / "01_degradation.ipynb", executed / "01_degradation.failed.ipynb"

    def execute(text, error=None):
        def fake(src, out, parameters, **kw):
            Path(out).write_text(text)  # papermill saves the notebook as it goes, error cell included
            tables.mkdir(parents=True, exist_ok=True)  # and the notebook writes its tables as it goes
            (tables / "table.csv").write_text(text)
            (tables / f"only-in-{json.loads(text)['run']}.csv").write_text(text)
            if error:
                raise error
        monkeypatch.setattr(pm, "execute_notebook", fake)
        return report.build("smoke", only=["01_degradation"], kernel="python3")

    def table_files():
        return sorted(p.name for p in tables.iterdir()), (tables / "table.csv").read_text()

    assert execute('{"run": 1}')["status"].tolist() == ["done"]
    assert table_files() == (["only-in-1.csv", "table.csv"], '{"run": 1}')
    table = execute('{"run": 2, "error cell": true}', error=RuntimeError("cell 3: ValueError: boom"))
    assert table["status"].tolist() == ["failed"] and table["output"].tolist() == [str(failed)]
    run = lambda p: json.loads(p.read_text())["run"]
    assert run(good) == 1 and failed.read_text() == '{"run": 2, "error cell": true}'
    assert table_files() == (["only-in-1.csv", "table.csv"], '{"run": 1}')  # run 2's tables are gone
    assert str(failed) in caplog.text and str(good) in caplog.text
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-notebook: the tables are put back too
        execute('{"run": 4}', error=KeyboardInterrupt())
    assert table_files() == (["only-in-1.csv", "table.csv"], '{"run": 1}')
    assert execute('{"run": 3}')["status"].tolist() == ["done"]
    assert run(good) == 3 and not failed.exists()
    assert table_files() == (["only-in-1.csv", "only-in-3.csv", "table.csv"], '{"run": 3}')
    assert sorted(p.name for p in executed.iterdir()) == ["01_degradation.ipynb"]  # no temporary file left
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == [
        "01_degradation", "RESULTS.md", "claims.csv", "claims.md", "executed"]  # no copy left beside them


def test_a_failed_first_report_leaves_no_tables(tmp_path, monkeypatch):
    """With no earlier execution, a failed one leaves no half-written tables for the claims to read."""
    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    tables = tmp_path / "smoke" / "01_degradation"

    def fake(src, out, parameters, **kw):
        tables.mkdir(parents=True, exist_ok=True)
        (tables / "table.csv").write_text("arch,depth\nplain,20\n")
        raise RuntimeError("boom")
    monkeypatch.setattr(pm, "execute_notebook", fake)
    assert report.build("smoke", only=["01_degradation"], kernel="python3")["status"].tolist() == ["failed"]
    assert not tables.exists()


def test_a_report_killed_outright_has_its_last_good_tables_put_back_by_the_next(tmp_path, monkeypatch, caplog):
    """`kill -9` mid-notebook leaves the copy it made beside the folder, and the folder half-written: the next report
    restores the copy before it starts (here it then fails, so the restored tables stay). A copy that cannot be made
    (a full disk) does not stop the notebook; hidden folders are never listed as outputs."""
    import shutil

    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    smoke = tmp_path / "smoke"
    tables, dead = smoke / "01_degradation", smoke / f".01_degradation.before-{2**22 + 7}"  # above any pid_max
    for folder, text in ((tables, "half-written"), (dead, "last good")):
        folder.mkdir(parents=True)
        (folder / "table.csv").write_text(text)
    (dead / report.BACKUP_MARK).write_text('{"executed": null}')  # whole, made before any executed notebook
    (smoke / f".01_degradation.failed-{2**22 + 7}").mkdir()

    def fail(src, out, parameters, **kw):
        assert (tables / "table.csv").read_text() == "last good"  # restored before the notebook runs
        (tables / "table.csv").write_text("from a failed run")
        raise RuntimeError("boom")
    monkeypatch.setattr(pm, "execute_notebook", fail)
    assert report.build("smoke", only=["01_degradation"], kernel="python3", force=True)["status"].tolist() == ["failed"]
    assert (tables / "table.csv").read_text() == "last good" and "was killed while executing" in caplog.text
    assert sorted(p.name for p in smoke.iterdir()) == ["01_degradation", "RESULTS.md", "claims.csv", "claims.md", "executed"]
    (smoke / ".02_depth.before-1").mkdir()
    (smoke / ".02_depth.before-1" / "table.csv").write_text("x")
    assert report.outputs("smoke")["notebook"].tolist() == ["01_degradation"]

    def ok(src, out, parameters, **kw):
        Path(out).write_text("{}")
        (tables / "table.csv").write_text("new")
    monkeypatch.setattr(pm, "execute_notebook", ok)
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert report.build("smoke", only=["01_degradation"], kernel="python3", force=True)["status"].tolist() == ["done"]
    assert (tables / "table.csv").read_text() == "new" and "could not copy" in caplog.text


def test_an_interrupted_report_still_checks_the_claims_on_the_tables_it_left(tmp_path, monkeypatch):
    """Ctrl-C in the third notebook: the two done by then have new tables, which claims.md and RESULTS.md
    must describe (they are rewritten on the way out), and the interrupt still stops the report."""
    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    calls = []

    def one(name, *a, **k):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"notebook": name, "status": "done", "seconds": 0.0, "output": "", "error": ""}

    monkeypatch.setattr(report, "_build_one", one)
    with pytest.raises(KeyboardInterrupt):
        report.build("smoke")
    assert len(calls) == 3
    assert (tmp_path / "smoke" / "claims.md").exists() and (tmp_path / "smoke" / "RESULTS.md").exists()


def test_the_report_notebook_shows_every_table_and_figure_under_a_heading(tmp_path, monkeypatch):
    import IPython.display as D
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    (tmp_path / "smoke" / "01_degradation").mkdir(parents=True)
    pd.DataFrame({"err": [0.12345]}).to_csv(tmp_path / "smoke" / "01_degradation" / "table.csv", index=False)
    plt.figure().savefig(tmp_path / "smoke" / "01_degradation" / "degradation.png")
    shown = []
    monkeypatch.setattr(D, "display", shown.append)
    report.show("smoke")
    kinds = [type(x).__name__ for x in shown]
    assert kinds == ["Markdown", "Image", "Markdown", "DataFrame"]  # sorted by file name: .png before table
    assert shown[0].data == "### 01_degradation · degradation" and shown[3].iloc[0, 0] == 0.123


def test_a_copy_aside_killed_part_way_or_outlived_by_its_execution_is_never_put_back(tmp_path, caplog):
    """A report killed while copying the tables aside left a partial copy, which the next report put back over the
    whole folder (figures lost); one killed after its execution had replaced the executed notebook put the old
    tables back beside the new notebook. Only a whole copy whose execution never finished is restored."""
    from resnet_lab import report

    dead = 2**22 + 7  # above any pid_max
    executed = tmp_path / "executed" / "01_degradation.ipynb"
    executed.parent.mkdir()
    executed.write_text("{}")
    folder = tmp_path / "01_degradation"
    folder.mkdir()
    for f in ("table.csv", "degradation.png"):
        (folder / f).write_text("good")

    def leave(kind, files, stamp):
        aside = tmp_path / f".01_degradation.{kind}-{dead}"
        aside.mkdir()
        for f in files:
            (aside / f).write_text("old")
        if stamp is not None:
            (aside / report.BACKUP_MARK).write_text(stamp)
        return aside

    leave("copying", ["table.csv"], None)  # killed inside the copy
    leave("before", ["table.csv"], None)  # a copy without its stamp (made by a copy killed before it was stamped)
    backup = report._backup(folder, executed)
    assert sorted(p.name for p in folder.iterdir()) == ["degradation.png", "table.csv"]
    assert (folder / "table.csv").read_text() == "good" and "was killed" not in caplog.text
    report._settle(folder, backup, ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_degradation", "executed"]

    stale = json.dumps({"executed": report._identity(executed)})
    new = executed.with_name(".new.ipynb")
    new.write_text('{"new": 1}')
    leave("before", ["table.csv", "degradation.png"], stale)  # whole, but its execution then finished
    os.replace(new, executed)
    report._backup(folder, executed)
    assert (folder / "table.csv").read_text() == "good" and "was killed" not in caplog.text

    leave("before", ["table.csv", "degradation.png"], json.dumps({"executed": report._identity(executed)}))
    backup = report._backup(folder, executed)  # whole, and the notebook is still the one it guarded
    assert (folder / "table.csv").read_text() == "old" and "was killed" in caplog.text
    assert not (folder / report.BACKUP_MARK).exists() and (backup / report.BACKUP_MARK).exists()


def test_a_report_without_the_runs_keeps_the_tables_it_cannot_redraw(tmp_path, monkeypatch, caplog):
    """A clone has no run store (git-ignored): `report --preset paper` there replaced the committed tables with
    empty ones and deleted the figures. A notebook is kept (exit 1: not redrawn), unless forced, where a run its
    tables were drawn from is missing; without that record, where tables with rows meet a store with none of
    its runs. An execution records its runs; fewer runs, or other parameters, are redrawn when none is lost."""
    import pandas as pd
    import papermill as pm

    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    smoke = tmp_path / "smoke"
    tables, executed = smoke / "01_degradation", smoke / "executed" / "01_degradation.ipynb"
    tables.mkdir(parents=True)
    (tables / "table.csv").write_text("committed")
    (tables / "rows.csv").write_text("run\n1\n")
    (tables / "degradation.png").write_text("committed")
    executed.parent.mkdir()
    executed.write_text('{"metadata": {}}')  # written before executions recorded their runs
    ran = []

    def fake(src, out, parameters, **kw):
        ran.append(parameters)
        Path(out).write_text('{"metadata": {}}')
        tables.mkdir(exist_ok=True)
        (tables / "rows.csv").write_text("run\n")

    monkeypatch.setattr(pm, "execute_notebook", fake)
    drawn = {"now": ([], 4)}
    monkeypatch.setattr(report, "_runs_drawn", lambda name, params: drawn["now"])
    build = lambda **kw: report.build("smoke", only=["01_degradation"], kernel="python3", **kw)["status"].tolist()  # noqa: E731
    status = report.build("smoke", only=["01_degradation"], kernel="python3")
    assert status["status"].tolist() == ["kept"] and "report --force" in status["error"][0] and not ran
    assert sorted(p.name for p in tables.iterdir()) == ["degradation.png", "rows.csv", "table.csv"]
    assert (tables / "rows.csv").read_text() == "run\n1\n" and "holds 0 of the 4" in caplog.text
    assert sorted(p.name for p in smoke.iterdir()) == ["01_degradation", "RESULTS.md", "claims.csv", "claims.md",
                                                      "executed"]  # no copy left beside them
    record = lambda: json.loads(executed.read_text())["metadata"][report.RECORD]["runs"]  # noqa: E731

    drawn["now"] = (["a", "b", "c"], 4)  # some stored, and no record: redrawn, and its runs recorded
    assert build() == ["done"] and record() == ["a", "b", "c"]
    drawn["now"] = (["a", "c"], 4)  # one of them gone
    assert build() == ["kept"] and len(ran) == 1 and "1 of the 3 runs its tables were drawn from are not in it (b)" \
        in caplog.text
    assert build(force=True) == ["done"] and len(ran) == 2 and record() == ["a", "c"]
    drawn["now"] = (["a"], 1)  # other parameters, every run they read stored, none of the old ones lost but c
    assert build() == ["kept"]
    drawn["now"] = (["a", "c", "d"], 3)  # more runs: redrawn
    assert build() == ["done"] and record() == ["a", "c", "d"]
    drawn["now"] = None  # a notebook that reads no runs (07), or a store that cannot tell: redrawn
    assert build() == ["done"]
    executed.write_text('{"metadata": {}}')  # no record, tables without rows (written from no runs): redrawn
    drawn["now"] = ([], 4)
    assert build() == ["done"]

    calls = iter([(["a"], 4), (["a", "e"], 4)])  # e finished while the notebook ran (a sweep beside it): drawn too
    monkeypatch.setattr(report, "_runs_drawn", lambda name, params: next(calls))
    assert build() == ["done"] and record() == ["a", "e"]
    monkeypatch.setattr(report, "_runs_drawn", lambda name, params: (["a"], 4))
    monkeypatch.setattr(report, "load_runs", lambda: pd.DataFrame({"hash": ["e"]}))
    assert build() == ["kept"] and "1 of the 2 runs its tables were drawn from are stored but not drawn now (e:" \
        in caplog.text
    import shutil
    shutil.rmtree(tables)  # nothing left to keep: drawn from what is stored
    assert build() == ["done"]


@needs_data
def test_the_runs_a_notebook_draws_from_are_those_stored_and_for_04_analysed(cifar, tmp_path, monkeypatch):
    """04 leaves out a run without its cached analysis (a report does not compute them): such a run would be
    lost to its tables as surely as a missing one. `stamp` records what make reproduce's executions drew."""
    import nbformat
    import pandas as pd

    from resnet_lab import experiments as ex, report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    assert ex.drawn_runs("01_degradation", {"preset": "smoke", "seeds": [0, 1]}) == ([], 8)
    assert report._runs_drawn("07_imagenet_architectures", {"preset": "smoke"}) is None  # it reads no runs
    p = {"preset": "smoke", "depth": 8, "seeds": [0], "draws": 1, "eval_images": 16, "grad_samples": 1}
    cfgs = ex.unravel_configs("smoke", 8, [0], "resnet")
    ex.train_all(cfgs, device="cpu")
    hashes = sorted(c.hash for c in ex.with_dataset(cfgs))  # the ResNet and its plain twin
    assert ex.drawn_runs("04_unraveled_ensemble", p) == ([], 2)
    ex.analyse_notebook("04_unraveled_ensemble", p, device="cpu")
    assert ex.drawn_runs("04_unraveled_ensemble", p) == (hashes, 2)

    stopped = pd.DataFrame({"hash": ["f", "r", "s"], "status": ["done", "running", "running"], "steps_done": [6, 0, 3]})
    monkeypatch.setattr(ex, "collect", lambda cfgs: (stopped, None, []))  # 05 shows the runs stopped part-way too
    assert ex.drawn_runs("05_thousand_layers", {"preset": "smoke"})[0] == ["f", "s"]
    assert ex.drawn_runs("01_degradation", {"preset": "smoke"})[0] == ["f"]
    monkeypatch.undo()
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))

    executed = tmp_path / "smoke" / "executed"
    executed.mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {k: v for k, v in p.items() if k != "preset"}}
    nbformat.write(nb, executed / "04_unraveled_ensemble.ipynb")
    report.stamp("smoke", executed)
    stamped = json.loads((executed / "04_unraveled_ensemble.ipynb").read_text())["metadata"]
    assert stamped[report.RECORD]["runs"] == hashes
