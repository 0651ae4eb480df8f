"""A notebook run directly (JupyterLab, papermill) refuses a bad parameter as `resnet-lab sweep` does: by the
notebook's parameter name, with the allowed values, before any work; and its captions say what was measured."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from resnet_lab import analysis, experiments as ex


@pytest.mark.parametrize("kw, needle", [(dict(eval_images=0), "eval_images=0"), (dict(eval_images=20_000), "10,000"),
                                        (dict(grad_samples=0), "grad_samples=0"), (dict(draws=True), "draws=True"),
                                        (dict(grad_batch=-1), "grad_batch=-1")])
def test_unravel_counts_are_checked_before_any_analysis(kw, needle):
    with pytest.raises(ValueError, match="positive integer") as e:
        ex.unravel_params(**kw)
    assert needle in str(e.value)


def test_responses_refuse_more_images_than_the_test_set_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "load_cifar10", lambda *a, **k: pytest.fail("loaded the data"))
    runs = pd.DataFrame([dict(status="done")])
    for bad in (20_000, 0):
        with pytest.raises(ValueError, match=f"max_images={bad} is not valid"):
            ex.responses(runs, max_images=bad, root=tmp_path)


@pytest.mark.parametrize("kw, needle", [(dict(repeats=0), "repeats=0"), (dict(batch_size=0), "batch_size=0")])
def test_imagenet_timing_counts_are_checked(kw, needle, monkeypatch):
    monkeypatch.setattr(analysis, "imagenet_model", lambda d: pytest.fail("built a model"))
    with pytest.raises(ValueError, match=needle):
        ex.imagenet_architectures([18], device="cpu", **kw)


def test_an_unknown_preset_makes_no_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    with pytest.raises(ValueError, match=r"preset='bogus' is not valid: use one of \['paper', 'quick', 'smoke'\]"):
        ex.output_dir("bogus", "07_imagenet_architectures")
    with pytest.raises(ValueError, match="preset='bogus'"):
        ex.imagenet_configs("bogus", [18])
    assert not any(tmp_path.iterdir())
    by_hand = ex.output_dir("quick", "07_imagenet_architectures")
    assert by_hand == tmp_path / "quick" / "scratch" / "07_imagenet_architectures"
    monkeypatch.setenv("RESNET_LAB_OUTPUT_DIR", str(tmp_path / "there"))  # what report, make and sweep set
    assert ex.output_dir("quick", "07_imagenet_architectures") == tmp_path / "there"


def test_the_median_timing_of_an_even_count_is_the_middle_twos_mean(monkeypatch):
    class Slow(torch.nn.Module):  # each forward advances a fake clock: 1 s (the warm-up), then 1 s and 3 s
        def __init__(self):
            super().__init__()
            self.now, self.costs = 0.0, iter([1.0, 1.0, 3.0])

        def forward(self, x):
            self.now += next(self.costs)
            return x

    m = Slow()
    monkeypatch.setattr("time.perf_counter", lambda: m.now)
    assert analysis.time_model(m, 1, repeats=2, image_size=4) == 2.0  # not the larger, 3
    with pytest.raises(ValueError, match="repeats=0 is not valid"):
        analysis.time_model(torch.nn.Identity(), 1, repeats=0)


def test_a_figure_measured_on_other_images_says_which():
    runs = pd.DataFrame([dict(status="done", name="resnet-20", seed=0, preset="quick", iterations=640, batch_size=32,
                              train_subset=None, eval_subset=1000, split="full")])
    assert ex.runs_note(runs).endswith("; seed 0; errors on 1,000 test images")
    note = ex.runs_note(runs, measured="errors on 10,000 test images")
    assert note.endswith("; seed 0; errors on 10,000 test images") and "1,000" not in note


NOTEBOOKS = [f"{n}" for n in ("01_degradation", "02_depth", "03_shortcut_ablations", "04_unraveled_ensemble",
                              "05_thousand_layers", "06_layer_responses", "07_imagenet_architectures",
                              "08_fast_path_fidelity")]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_each_notebook_checks_its_parameters_before_any_work(notebook):
    """The first cell after the parameters calls sweep.check_notebook, and its defaults pass it."""
    import nbformat

    from resnet_lab import sweep

    nb = nbformat.read(ex.NOTEBOOKS_DIR / f"{notebook}.ipynb", as_version=4)
    codes = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in codes[0].metadata.get("tags", [])
    first = [ln for ln in codes[1].source.splitlines() if ln and not ln.startswith(("from ", "import "))][0]
    assert first.startswith(f'sweep.check_notebook("{notebook}", globals())'), first
    sweep.check_notebook(notebook, {**ex.notebook_defaults(notebook), "device": "cpu"})


@pytest.mark.parametrize("notebook, bad, needle", [
    ("01_degradation", dict(train_missing="false"), "'false' is str but the notebook's train_missing is bool "
                                                   "(default True); papermill's -p makes only True and False bools: "
                                                   "-p train_missing False, or -y 'train_missing: false'"),
    ("04_unraveled_ensemble", dict(analyse_missing="False"), "analyse_missing is bool"),
    ("04_unraveled_ensemble", dict(draws=0), "draws=0 is not valid"),
    ("06_layer_responses", dict(max_images=20_000), "max_images=20000 is not valid: use a positive integer up to"),
    ("02_depth", dict(device="gpu"), "device='gpu' is not valid: use auto, cpu, cuda or cuda:N"),
    ("02_depth", dict(device="cuda"), "device='cuda': this machine has no CUDA device: use cpu or auto"),
    ("07_imagenet_architectures", dict(repeats=0), "repeats=0 is not valid"),
    ("03_shortcut_ablations", dict(seeds=0), "value 0 is int but the notebook's seeds is list"),
])
def test_a_bad_parameter_of_a_notebook_run_directly_is_named(notebook, bad, needle, monkeypatch):
    from resnet_lab import sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever machine runs this
    with pytest.raises(ValueError) as e:
        sweep.check_notebook(notebook, {**ex.notebook_defaults(notebook), **bad})
    assert needle in str(e.value), str(e.value)


def test_the_gate_band_stays_inside_a_sigmoids_range():
    from resnet_lab import plots

    lo, hi = plots.t_interval(pd.Series([0.0, 0.1]))
    assert lo < 0 and (plots.t_interval_gate(pd.Series([0.0, 0.1])) == (0.0, hi))  # two seeds: t(1) = 12.7
    assert plots.t_interval_gate(pd.Series([1.0, 0.9]))[1] == 1.0


def test_whole_floats_of_int_parameters_become_ints_as_a_sweep_injects_them():
    from resnet_lab import sweep

    ns = {**ex.notebook_defaults("06_layer_responses"), "max_images": 200.0, "depths": [8.0, 14], "device": "cpu"}
    sweep.check_notebook("06_layer_responses", ns)
    assert ns["max_images"] == 200 and type(ns["max_images"]) is int
    assert ns["depths"] == [8, 14] and all(type(d) is int for d in ns["depths"])
    with pytest.raises(ValueError, match="8.5"):
        sweep.check_notebook("06_layer_responses", {**ns, "depths": [8.5]})
