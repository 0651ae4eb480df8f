"""Every notebook runs through papermill with the smoke preset and writes its tables and figures."""
import json
import os
from pathlib import Path

import pytest

from .conftest import ROOT, needs_data

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OUTPUTS = {  # notebook -> (extra parameters, files it must write under results/smoke/scratch/<notebook>/)
    "01_degradation": ({}, ["table.csv", "degradation.png", "degradation.pdf"]),
    "02_depth": ({"depths": [20, 32]}, ["table.csv", "test_error_vs_depth.png", "curves.pdf"]),
    "03_shortcut_ablations": ({"depths": [20], "variants": ["plain", "A", "B", "skip3", "highway", "gated"]},
                              ["table.csv", "pivot_test_error.csv", "test_error_by_variant.png", "curves.png",
                               "highway_gates.png"]),
    "04_unraveled_ensemble": ({"depth": 20, "eval_images": 200, "grad_samples": 2, "draws": 2},
                              ["lesion.csv", "delete.csv", "reorder.csv", "gradient.csv", "effective.csv",
                               "lesion.png", "delete_reorder.png", "path_lengths.pdf"]),
    "05_thousand_layers": ({"depths": [20, 1202], "checkpoint_segments": 2},
                           ["table.csv", "unfinished.csv", "curves.png"]),
    "06_layer_responses": ({"max_images": 300}, ["responses.csv", "responses.png", "responses.pdf"]),
    "07_imagenet_architectures": ({"depths": [18, 50], "batch_size": 1, "repeats": 1}, ["table.csv", "gmacs.png"]),
    "08_fast_path_fidelity": ({"seeds": [0, 1]}, ["table.csv", "curves.png", "curves.pdf"]),
}


def test_notebooks_are_committed_clean_with_one_parameters_cell():
    assert NOTEBOOKS
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb_path.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: needs exactly one cell tagged 'parameters'"
        for line in "".join(tagged[0]["source"]).splitlines():  # plain literals, each with a comment
            if line.strip():
                assert "=" in line and "#" in line, f"{nb_path.name}: parameter line without a comment: {line}"


@needs_data
@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_notebook_runs_with_smoke_preset(name, tmp_path, monkeypatch):
    import papermill as pm

    from resnet_lab import experiments as ex
    from resnet_lab.runs import RunDir

    out_nb = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out_nb), parameters={"preset": "smoke", **OUTPUTS[name][0]},
                        kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    out = Path(os.environ["RESNET_LAB_RESULTS"]) / "smoke" / "scratch" / name  # run by hand: not the report's
    for f in OUTPUTS[name][1]:
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    assert not (out.parent.parent / name).exists()  # results/smoke/<notebook>/ is the report's (and make's)
    if name in ex.NOTEBOOK_ANALYSES:  # the notebook cached its analyses where `resnet-lab analyse` looks for them
        monkeypatch.setattr(RunDir, "load_model_and_sha256", lambda *a, **k: pytest.fail("analysis not cached"))
        done, _, missing = ex.analyse_notebook(name, {"preset": "smoke", **OUTPUTS[name][0]})
        assert done and not missing
