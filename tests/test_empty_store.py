"""A store that holds none of a notebook's runs yet (the paper runs arrive one GPU session at a time): the
notebooks and the report still run to the end, tables keep their columns, figures say so and write no file."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from resnet_lab import claims, experiments as ex, plots
from resnet_lab.config import make_config
from resnet_lab.runs import load_metrics, load_runs

from .conftest import needs_data


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    return tmp_path


def test_an_empty_store_reads_as_tables_with_columns(empty_store):
    runs = load_runs()
    assert runs.empty and {"hash", "arch", "depth", "seed", "status", "final_test_err"} <= set(runs.columns)
    assert runs[runs["status"] == "done"].empty  # what every analysis starts with
    assert load_runs(preset="paper").empty  # a filter on an empty store names a real column
    assert ex.depth_table(runs).empty and ex.degradation_table(runs).empty
    assert load_metrics().empty


def test_figures_of_nothing_say_so_and_save_no_file(empty_store):
    runs, curves = load_runs(), load_metrics()
    unravel = {k: pd.DataFrame(columns=cols + ex.UNRAVEL_TAGS) for k, cols in ex.UNRAVEL_COLUMNS.items()}
    figures = [plots.degradation_figure(curves), plots.curves_figure(curves, hue="depth"),
               plots.depth_figure(runs, ex.PAPER_TEST_ERR), plots.bars_figure(ex.with_variant(runs), x="variant"),
               plots.gates_figure(pd.DataFrame(columns=["block", "mean_gate", "net"])),
               plots.responses_figure(pd.DataFrame(columns=ex.RESPONSE_COLUMNS)),
               plots.lesion_figure(unravel["lesion"]), plots.deletion_figure(unravel["delete"], unravel["reorder"]),
               plots.paths_figure(unravel["paths"], unravel["gradient"], unravel["effective"])]
    for i, fig in enumerate(figures):
        assert fig.no_data, i
        assert "no finished runs" in fig.axes[0].texts[0].get_text()
        assert plots.save(fig, empty_store / "out", f"fig{i}") == []
    assert not (empty_store / "out").exists()
    one = pd.DataFrame({"depth": [20], "status": ["done"], "final_test_err": [0.09]})
    stale = plots.save(plots.depth_figure(one, ex.PAPER_TEST_ERR), empty_store / "out", "d")
    assert [p.name for p in stale] == ["d.png", "d.pdf"]
    assert plots.save(plots.depth_figure(runs, ex.PAPER_TEST_ERR), empty_store / "out", "d") == []
    assert not any(p.exists() for p in stale)  # a figure of runs no longer in the store does not stay behind


def test_claims_read_a_header_only_or_empty_table_as_not_run(empty_store):
    base = empty_store / "paper" / "01_degradation"
    base.mkdir(parents=True)
    (base / "table.csv").write_text("arch,depth,runs,train_err_%,test_err_%\n")
    table = claims.check("paper")
    assert set(table["holds"]) == {"not run"}
    (base / "table.csv").write_text("")
    assert set(claims.check("paper")["holds"]) == {"not run"}


@needs_data
def test_unravel_tables_keep_their_columns_with_and_without_runs(empty_store, cifar):
    """UNRAVEL_COLUMNS is what the analyses return: an empty store gives the same tables, without rows."""
    kw = dict(draws=1, eval_images=20, grad_samples=1, grad_batch=4, device="cpu")
    empty = ex.unravel_analysis(load_runs(), **kw)
    ex.train_all(ex.with_dataset([make_config("smoke", arch=a, depth=8) for a in ("resnet", "plain")]),
                 device="cpu", progress=False)
    full = ex.unravel_analysis(load_runs(), **kw)
    assert set(empty) == set(full) == set(ex.UNRAVEL_COLUMNS)
    for name, df in full.items():
        assert len(df) and empty[name].empty, name
        assert list(empty[name].columns) == list(df.columns), name
    resp = ex.responses(load_runs(), max_images=20)
    assert len(resp) and list(resp.columns) == ex.RESPONSE_COLUMNS
    assert list(ex.responses(load_runs().iloc[0:0]).columns) == ex.RESPONSE_COLUMNS


@needs_data
def test_report_of_notebooks_with_no_stored_run_completes(empty_store, cifar):
    from resnet_lab import report

    status = report.build("smoke", only=["02_depth", "04_unraveled_ensemble"], kernel="python3")
    assert status["status"].tolist() == ["done", "done"], status["error"].tolist()
    out = empty_store / "smoke"
    assert not list(out.rglob("*.png"))  # no figure of nothing
    assert pd.read_csv(out / "04_unraveled_ensemble" / "lesion.csv").columns.tolist()[:2] == ["block", "stage"]
    assert set(pd.read_csv(out / "claims.csv")["holds"]) == {"not run"}


def test_curves_are_those_of_finished_runs_only(empty_store, monkeypatch):
    """A run imported half-way (status running) is in `runs` and `missing`, but its curve is not drawn."""
    import dataclasses

    from resnet_lab.runs import METRIC_COLUMNS, runs_dir

    monkeypatch.setattr(ex, "with_dataset", lambda cfgs, source=None: [dataclasses.replace(c, dataset="t")
                                                                         for c in cfgs])
    cfgs = ex.with_dataset([make_config("smoke", depth=8, seed=s) for s in (0, 1)])
    for cfg, status in zip(cfgs, ("done", "running")):
        d = runs_dir() / cfg.hash
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
        (d / "summary.json").write_text(json.dumps({"status": status}))
        (d / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n" + ",".join(["1"] * len(METRIC_COLUMNS)) + "\n")
    runs, curves, missing = ex.collect(cfgs)
    assert len(runs) == 2 and [c.seed for c in missing] == [1]
    assert curves["seed"].tolist() == [0]
    runs, curves, missing = ex.collect(cfgs[1:])
    assert curves.empty and "test_err" in curves.columns


def _store(cfgs, statuses):
    import json

    from resnet_lab.runs import METRIC_COLUMNS, runs_dir

    for cfg, status in zip(cfgs, statuses):
        d = runs_dir() / cfg.hash
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
        (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": 1, "final_train_err": 0.5,
                                                    "final_test_err": 0.5, "params": 1, "flops": 1}))
        (d / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n" + ",".join(["1"] * len(METRIC_COLUMNS)) + "\n")


def test_a_diverged_run_is_left_out_of_the_curves_as_of_the_means_and_named(empty_store, monkeypatch):
    """The tables count a diverged seed but do not average it; its curve (near chance) must not pull the
    figure's mean either. It is not `missing` (training it again would diverge again), and the note says so."""
    import dataclasses

    monkeypatch.setattr(ex, "with_dataset", lambda cfgs, source=None: [dataclasses.replace(c, dataset="t")
                                                                         for c in cfgs])
    cfgs = ex.with_dataset([make_config("smoke", depth=8, seed=s) for s in (0, 1, 2)])
    _store(cfgs, ("done", "diverged", "done"))
    runs, curves, missing = ex.collect(cfgs)
    assert not missing and sorted(curves["seed"]) == [0, 2]
    note = ex.runs_note(runs)
    assert "seeds 0, 2;" in note and note.endswith("; diverged, not drawn: resnet-8 seed 1"), note
    assert ex.runs_note(runs[runs["seed"] == 1]) == "diverged, not drawn: resnet-8 seed 1"
    row = ex.depth_table(runs).iloc[0]
    assert row["runs"] == 2 and row["diverged"] == 1


def test_runs_that_have_not_finished_give_tables_with_their_columns(empty_store, monkeypatch):
    """ResNet-1202 back from a lease it outlasted, before any other run: 05 must still reach its list of
    runs stopped part-way, and every table keeps its columns (with no rows)."""
    import dataclasses

    monkeypatch.setattr(ex, "with_dataset", lambda cfgs, source=None: [dataclasses.replace(c, dataset="t")
                                                                         for c in cfgs])
    cfgs = ex.with_dataset([make_config("smoke", arch=a, depth=d) for a in ("plain", "resnet") for d in (8, 14)])
    _store(cfgs, ("running", "running", "failed", "running"))
    runs = ex.collect(cfgs)[0]
    for table in (ex.degradation_table(runs), ex.depth_table(runs), ex.thousand_table(runs), ex.ablation_table(runs)):
        assert table.empty and {"runs", "train_err_%", "test_err_%"} <= set(table.columns)
    assert len(ex.unfinished(runs)[0]) == 3
    claims = ex.degradation_claims(ex.degradation_table(runs)).set_index("arch")
    assert list(claims["holds here"]) == ["not run (no run that finished without diverging)"] * 2


def test_a_damaged_run_folder_is_skipped_not_fatal(empty_store, caplog):
    """One bad folder (a disk error, a hand edit, a run from a newer version) must not stop every table."""
    import json

    from resnet_lab.runs import RunDir, load_metrics, runs_dir

    cfgs = [make_config("smoke", depth=8, seed=s) for s in range(6)]
    _store(cfgs, ["done"] * 6)
    folders = [runs_dir() / c.hash for c in cfgs]
    (folders[1] / "config.json").write_bytes(b"\x80\x81 not utf-8")
    (folders[2] / "config.json").write_text("[]")
    (folders[3] / "config.json").write_text(json.dumps({**cfgs[3].to_json(), "arch": "densenet"}))
    (folders[4] / "summary.json").write_text('"done"')  # not an object: reads as unfinished
    (folders[5] / "metrics.csv").write_text("")  # killed before its first row
    (runs_dir() / "stray.txt").write_text("x")
    runs = load_runs()
    assert sorted(runs["seed"]) == [0, 4, 5] and runs.set_index("seed")["status"].to_dict() == {
        0: "done", 4: "running", 5: "done"}
    assert "densenet" in caplog.text and "not a readable JSON object" in caplog.text
    assert sorted(load_metrics()["seed"]) == [0, 4]  # seed 5 has no curve
    assert RunDir(cfgs[4]).summary() is None and RunDir(cfgs[5]).metrics().empty


def test_a_run_stopped_part_way_is_shown_apart_labelled_with_where_it_stands(empty_store, monkeypatch):
    """ResNet-1202 stopped short of its schedule (a GPU lease ended; its checkpoint cannot travel): listed with
    the iterations it reached, its curve drawn under a label that says so, never in the finished tables."""
    import dataclasses

    monkeypatch.setattr(ex, "with_dataset", lambda cfgs, source=None: [dataclasses.replace(c, dataset="t")
                                                                         for c in cfgs])
    cfgs = ex.with_dataset([make_config("smoke", depth=d, seed=s) for d, s in ((110, 0), (1202, 0), (1202, 1))])
    # a running one evaluated past its checkpoint, then killed: those 2 rows are not drawn
    _run_folders(cfgs, ("done", "running", "running"), (8, 3, 0), extra_rows=lambda status: 2 if status == "running" else 0)
    runs, curves, missing = ex.collect(cfgs)
    assert [c.depth for c in missing] == [1202, 1202]
    table, stopped_curves = ex.unfinished(runs)
    it = cfgs[1].iterations
    assert table[["depth", "seed", "steps_done", "iterations"]].values.tolist() == [[1202, 0, 3, it]]
    assert table["done_%"].tolist() == [pytest.approx(300 / it)] and table["test_err_%"].tolist() == [25.0]
    assert table["wall_min"].tolist() == [2.0] and list(table.columns) == ex.UNFINISHED_COLUMNS
    label = f"1202 (unfinished: 3 of {it:,} it.)"
    assert stopped_curves["depth"].unique().tolist() == [label] and stopped_curves["step"].tolist() == [1, 2, 3]
    shown = ex.thousand_curves(curves, stopped_curves)
    assert sorted(shown["depth"].unique()) == ["110", label] and len(shown) == 8 + 3
    fig = plots.curves_figure(shown, hue="depth")
    assert label in [t.get_text() for legend in fig.legends for t in legend.texts]
    assert ex.thousand_table(runs)["depth"].tolist() == [110]  # the means are over finished runs only
    none, no_curves = ex.unfinished(runs[runs["status"] == "done"])
    assert none.empty and list(none.columns) == ex.UNFINISHED_COLUMNS
    assert ex.thousand_curves(curves, no_curves)["depth"].unique().tolist() == ["110"]


def test_a_run_stored_before_a_field_existed_reads_with_its_default(empty_store):
    """`compile` came later: an older config.json lacks it, and a filter on it must still find the run."""
    import json

    from resnet_lab.runs import runs_dir

    old, new = make_config("smoke", depth=8, seed=0), make_config("smoke", depth=8, seed=1)
    _store([old, new], ["done"] * 2)
    cfg = json.loads((runs_dir() / old.hash / "config.json").read_text())
    del cfg["compile"]
    (runs_dir() / old.hash / "config.json").write_text(json.dumps(cfg))
    assert sorted(load_runs(compile=False)["seed"]) == [0, 1]


def test_a_notebook_says_which_runs_are_finished_stopped_failed_or_not_trained(empty_store, monkeypatch):
    import dataclasses

    monkeypatch.setattr(ex, "with_dataset", lambda cfgs, source=None: [dataclasses.replace(c, dataset="t")
                                                                         for c in cfgs])
    cfgs = ex.with_dataset([make_config("smoke", arch="resnet", depth=8, seed=s) for s in range(5)])
    _store(cfgs[:3], ("done", "running", "failed"))
    runs, _, missing = ex.collect(cfgs)
    line = ex.store_status(cfgs, runs, missing)
    assert line.startswith("1 of 5 runs finished; stopped part-way (or training now): resnet-8 seed 1 (")
    assert "failed (summary.json says why): resnet-8 seed 2" in line and line.endswith("not trained yet: resnet-8 (seeds 3, 4)")


def test_the_thousand_table_says_where_runs_diverged_and_what_finished_ones_trained(empty_store):
    """A depth whose every run diverged has no finished iterations (NaN, not the config's 64k) and says at
    which step each run stopped; a finished depth gives its iterations."""
    cfgs = ex.with_dataset([make_config("smoke", depth=d, seed=s) for d, s in ((110, 0), (1202, 0), (1202, 1))])
    _run_folders(cfgs, ("done", "diverged", "diverged"), (8, 6, 4))
    runs, _, _ = ex.collect(cfgs)
    t = ex.thousand_table(runs).set_index("depth")
    assert t.loc[110, "iterations"] == cfgs[0].iterations and t.loc[110, "diverged_at"] == ""
    assert pd.isna(t.loc[1202, "iterations"]) and t.loc[1202, "diverged_at"] == "4, 6"
    # the finished depth's errors name the images they are over (smoke evaluates on a subset); none finished: ""
    assert t.loc[110, "eval_images"] == f"{cfgs[0].eval_subset:,}" and t.loc[1202, "eval_images"] == ""
    assert t.loc[1202, "runs"] == 0 and t.loc[1202, "diverged"] == 2


def _run_folders(cfgs, statuses, steps, extra_rows=lambda status: 0) -> None:
    """Run folders as training leaves them: config, a summary with `status` and `steps_done`, a metrics row
    per step (and `extra_rows(status)` more)."""
    from resnet_lab.runs import METRIC_COLUMNS, runs_dir

    for cfg, status, n in zip(cfgs, statuses, steps):
        d = runs_dir() / cfg.hash
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
        (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": n, "final_train_err": 0.5,
                                                    "final_test_err": 0.25, "wall_seconds": 120.0, "device": "x",
                                                    "params": 1, "flops": 1}))
        rows = [",".join(str(v) for v in [s, s / 10, 0.1, 2.0, 0.5, 2.0, 0.25, s]) for s in range(1, n + 1 + extra_rows(status))]
        (d / "metrics.csv").write_text("\n".join([",".join(METRIC_COLUMNS), *rows]) + "\n")
