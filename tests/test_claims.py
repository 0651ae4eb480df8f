"""The claims table: verdicts computed from the stored tables, with the criterion beside each."""
import pandas as pd

from resnet_lab import claims


def _table(rows):
    return pd.DataFrame(rows, columns=["arch", "depth", "runs", "train_err_%", "test_err_%"])


def _write(base, notebook, name, df):
    (base / notebook).mkdir(parents=True, exist_ok=True)
    df.to_csv(base / notebook / f"{name}.csv", index=False)


def lesion_rows(net, arch, depth, base_err, errs, shape_blocks=()):
    return [dict(block=b, stage=0, changes_shape=b in shape_blocks, has_shortcut=arch != "plain", err=e,
                 base_err=base_err, net=net, arch=arch, depth=depth, seed=0) for b, e in enumerate(errs)]


def test_paper_shaped_results_hold_and_the_opposite_does_not(tmp_path):
    base = tmp_path / "paper"
    _write(base, "01_degradation", "table", _table([
        ("plain", 20, 3, 2.0, 9.5), ("plain", 56, 3, 4.0, 13.5), ("resnet", 20, 3, 1.0, 8.8), ("resnet", 56, 3, 0.5, 7.0)]))
    _write(base, "02_depth", "table", _table([("resnet", 20, 3, 1.0, 8.8), ("resnet", 56, 3, 0.5, 7.0)]))
    lesion = (lesion_rows("ResNet-110", "resnet", 110, 0.065, [0.07, 0.3, 0.068], shape_blocks=(1,))
              + lesion_rows("plain-110", "plain", 110, 0.1, [0.9, 0.9, 0.85]))
    _write(base, "04_unraveled_ensemble", "lesion", pd.DataFrame(lesion))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([dict(
        net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=5, effective_to=17)]))
    t = claims.check("paper", root=tmp_path)
    assert list(t["holds"]) == ["yes"] * 6, t.to_string()
    assert "block 0 +0.50 points" in t.loc[3, "ours"]  # the downsampling block 1 (+23.5) is left out
    assert (base / "claims.md").read_text().count("| yes |") == 6

    _write(base, "02_depth", "table", _table([("resnet", 20, 3, 1.0, 7.0), ("resnet", 56, 3, 0.5, 8.8)]))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([dict(
        net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=20, effective_to=40)]))
    t = claims.check("paper", root=tmp_path)
    assert t.loc[2, "holds"] == "NO" and t.loc[2, "ours"] == "20: 7.00%, 56: 8.80%"
    assert t.loc[5, "holds"] == "NO" and "20-40 of 54" in t.loc[5, "ours"]


def test_missing_tables_and_runs_are_not_run_rather_than_a_verdict(tmp_path):
    base = tmp_path / "quick"
    _write(base, "01_degradation", "table", _table([("plain", 20, 1, 2.0, 9.5), ("plain", 56, 0, None, None)]))
    t = claims.check("quick", root=tmp_path)
    assert set(t["holds"]) == {"not run"} and len(t) == 6
