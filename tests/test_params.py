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
    assert ex.output_dir("quick", "07_imagenet_architectures") == tmp_path / "quick" / "07_imagenet_architectures"


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
