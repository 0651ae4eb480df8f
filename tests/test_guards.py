"""Guards that a mutation review found untested: each test fails against the code with its guard removed
(the store behind a sweep's `done`, which parameters a report runs, what figures average, bench arithmetic)."""
import json
from pathlib import Path

import pytest

from resnet_lab import sweep
from resnet_lab.sweep import expand, load_grid

GOOD = "notebook: 01_degradation\npreset: smoke\nparameters:\n  seeds: [[0]]\n  depths: [[8]]\n"


def fake_executed(path, start_times=True):
    cell = {"cell_type": "code", "metadata": {"papermill": {"status": "completed",
            "start_time": "2024-01-01T00:00:00" if start_times else None}}, "source": "", "outputs": []}
    nb = {"cells": [cell, cell], "metadata": {"papermill": {"exception": False, "end_time": "2024-01-01T00:01:00"}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))


def test_a_clean_notebook_without_its_runs_is_not_done(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "results"))
    g = tmp_path / "g.yaml"
    g.write_text(GOOD)
    (p,) = expand(load_grid(g))
    fake_executed(p.output)
    assert sweep.executed_ok(p.output)
    assert not sweep.is_done(p)  # the store has none of its runs


def test_cells_that_never_started_are_not_a_clean_execution(tmp_path):
    fake_executed(tmp_path / "nb.ipynb", start_times=False)
    assert not sweep.executed_ok(tmp_path / "nb.ipynb")


def test_a_notebook_that_trains_nothing_is_done_once_it_ran_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "results"))
    g = tmp_path / "g.yaml"
    g.write_text("notebook: 07_imagenet_architectures\npreset: smoke\n")
    (p,) = expand(load_grid(g))
    fake_executed(p.output)
    assert sweep.is_done(p)


def test_counts_take_their_bound():
    sweep.check_params({"max_images": 10_000, "eval_images": 10_000})
    with pytest.raises(ValueError):
        sweep.check_params({"max_images": 10_001})


def test_concurrent_points_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(sweep, "_cores", lambda: list(range(8)))
    slots = sweep._cpu_slots(2)
    assert slots == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_import_never_overwrites_a_local_cached_analysis(tmp_path):
    from resnet_lab.transfer import export_runs, import_runs

    from .test_transfer import HASH, make_run
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    name = "analysis-unravel-0123456789ab.json"
    (make_run(gpu, "aaa", "done", 6) / name).write_text('{"from": "gpu"}')
    (make_run(here, "aaa", "done", 6) / name).write_text('{"from": "here"}')
    import_runs(export_runs(tmp_path / "out", root=gpu), root=here)
    assert json.loads((here / HASH["aaa"] / name).read_text()) == {"from": "here"}


def test_depth_figure_draws_finished_runs_only():
    import pandas as pd
    from resnet_lab import plots
    runs = pd.DataFrame({"depth": [20, 20, 20], "status": ["done", "done", "diverged"],
                         "final_test_err": [0.08, 0.10, 0.90]})
    fig = plots.depth_figure(runs)
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == pytest.approx([9.0])


def test_bars_draw_finished_runs_only():
    import pandas as pd
    from resnet_lab import plots
    runs = pd.DataFrame({"variant": ["A"] * 3, "depth": [20] * 3, "status": ["done", "done", "diverged"],
                         "final_test_err": [0.08, 0.10, 0.90]})
    g = plots.bars_figure(runs, x="variant")
    heights = [p.get_height() for p in g.axes[0].patches if p.get_height() > 0]
    assert heights == pytest.approx([9.0])


def test_sorted_responses_rank_1_is_the_strongest():
    import torch
    from resnet_lab.analysis import layer_responses
    from resnet_lab.data import eval_batches
    from resnet_lab.models import build_model
    torch.manual_seed(0)
    m = build_model("plain", 20).eval()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    df = layer_responses(m, eval_batches(x, torch.zeros(8, dtype=torch.long), 8))
    assert df.sort_values("rank")["std"].is_monotonic_decreasing


def test_pairings_count_every_set_of_disjoint_pairs():
    import itertools
    from resnet_lab.unravel import _pairings
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    pairs = [p for g in groups for p in itertools.combinations(g, 2)]
    for k in range(5):
        brute = sum(1 for s in itertools.combinations(pairs, k) if len({b for p in s for b in p}) == 2 * k)
        assert _pairings(groups, k) == brute, k


def test_effective_range_prefers_the_window_with_more_gradient():
    import pandas as pd
    from resnet_lab.unravel import effective_paths
    df = pd.DataFrame({"k": [0, 1, 2, 3], "total": [3.0, 4.0, 4.0, 2.0]})
    assert effective_paths(df, 0.7) == (0, 2)  # (1, 3) is as wide but holds less


def test_agreement_needs_the_loss_and_a_step_that_was_taken():
    from resnet_lab.fast import _require_agreement
    ok = {"loss_rel_diff": 0.0, "update_rel_diff": 0.0, "bn_stats_rel_diff": 0.0}
    _require_agreement(ok, "graph")
    with pytest.raises(RuntimeError, match="disagrees"):
        _require_agreement({**ok, "loss_rel_diff": 0.5}, "graph")
    with pytest.raises(RuntimeError, match="not checked"):
        _require_agreement({**ok, "skipped": True}, "graph")


def test_the_grids_report_section_beats_the_last_executions_parameters(tmp_path, monkeypatch):
    import papermill as pm
    from resnet_lab import report
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    old = tmp_path / "paper" / "executed" / "02_depth.ipynb"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"metadata": {"papermill": {"parameters": {"seeds": [0], "depths": [20]}}}}))
    seen = {}
    def fake_execute(src, out, parameters, **kw):
        seen[Path(src).stem] = parameters
        Path(out).write_text("{}")
    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    report.build("paper", only=["02_depth"], kernel="python3")
    assert seen["02_depth"]["seeds"] == [0, 1, 2] and seen["02_depth"]["depths"] == [20, 32, 44, 56, 110]


def test_bench_throughputs_count_every_image_of_every_run(monkeypatch):
    import torch
    from resnet_lab import bench
    monkeypatch.setattr(bench, "_timed", lambda steppers, *a, **k: (2.0, 10))  # 10 lockstep rounds in 2 s
    x, y = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,))
    cpu = torch.device("cpu")
    assert bench.ours_images_per_s(8, x, y, cpu, 16, 1.0)[0] == 10 * 16 / 2.0
    assert bench.packed_images_per_s(8, 3, x, y, cpu, 16, 1.0)[0] == 3 * 10 * 16 / 2.0
    assert bench.grouped_images_per_s(8, 3, x, y, cpu, 16, 1.0)[0] == 3 * 10 * 16 / 2.0
    ticks = iter([0.0, 0.5])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    assert bench.eval_seconds(8, x, y, cpu) == 0.5 * 10_000 / 64  # 64 images timed, scaled to the 10k test set
