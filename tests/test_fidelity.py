"""08: does the fast step (bf16, CUDA graph) learn what the reference loop (fp32, eager) learns?"""
import json

import pandas as pd
import pytest

from resnet_lab import claims, experiments as ex
from resnet_lab.analysis import t975


def _table(rows, diverged=None):
    t = pd.DataFrame(rows, columns=["precision", "loop", "runs", "train_err_%", "train_err_ci95", "test_err_%",
                                    "test_err_ci95"])
    return t.assign(diverged=diverged or [0] * len(t))


FAST = ("auto", "bf16, graph", 3, 1.4, 0.3, 12.2, 0.5)


def test_prediction_interval_for_one_more_seed():
    """n=3: sd = h*sqrt(3)/t(2), half = t(2)*sd*sqrt(4/3) = 2h; wider than the mean's CI, as it must be."""
    row = pd.Series({"runs": 3, "test_err_ci95": 0.5})
    assert claims.prediction_half_width(row, "test_err_%") == pytest.approx(1.0)
    row = pd.Series({"runs": 5, "test_err_ci95": 0.5})
    assert claims.prediction_half_width(row, "test_err_%") == pytest.approx(0.5 * 5 ** 0.5 * (1 + 1 / 5) ** 0.5)
    assert claims.prediction_half_width(pd.Series({"runs": 1, "test_err_ci95": float("nan")}), "test_err_%") is None
    assert t975(2) > 4  # the small-sample t the interval rests on


@pytest.mark.parametrize("ref_test, holds", [(12.9, "yes"), (11.3, "yes"), (13.3, "NO"), (10.9, "NO")])
def test_one_reference_run_is_judged_by_the_prediction_interval(ref_test, holds):
    v = ex.fidelity_verdict(_table([FAST, ("fp32", "fp32, eager", 1, 1.5, None, ref_test, None)]))
    assert list(v.columns) == ex.FIDELITY_COLUMNS
    test = v.iloc[0]
    assert test["holds here"] == holds and "prediction interval" in test["criterion"]
    assert test["reference - fast"].startswith(f"{ref_test - 12.2:+.2f} (interval ± 1.00)")
    assert test["fast"] == "bf16, graph: 12.20% ± 0.50 (3 runs)" and test["reference"] == f"fp32, eager: {ref_test:.2f}% (1 run)"
    assert v.iloc[1]["compared"] == "final training error" and v.iloc[1]["holds here"] == "yes"  # 1.5 vs 1.4 ± 0.6


def test_several_reference_runs_use_the_welch_interval():
    v = ex.fidelity_verdict(_table([FAST, ("fp32", "fp32, eager", 3, 1.4, 0.3, 12.4, 0.5)])).iloc[0]
    assert v["holds here"] == "yes" and "Welch" in v["criterion"]
    v = ex.fidelity_verdict(_table([FAST, ("fp32", "fp32, eager", 3, 1.4, 0.3, 14.0, 0.5)])).iloc[0]
    assert v["holds here"] == "NO"


def test_what_cannot_be_judged_says_why():
    same = ex.fidelity_verdict(_table([("auto", "fp32, eager", 3, 1, 0.1, 12, 0.5),
                                       ("fp32", "fp32, eager", 1, 1, None, 12, None)])).iloc[0]
    assert same["holds here"] == "not judged (both loops ran fp32, eager: the same computation)"
    one = ex.fidelity_verdict(_table([("auto", "bf16, graph", 1, 1, None, 12, None),
                                      ("fp32", "fp32, eager", 1, 1, None, 12.1, None)])).iloc[0]
    assert one["holds here"] == "not judged (seed noise not estimated: one fast run)"
    none = ex.fidelity_verdict(_table([FAST])).iloc[0]
    assert none["holds here"] == "not run (no finished reference run)" and none["fast"] == ""
    mixed = ex.fidelity_verdict(_table([FAST, ("auto", "bf16, eager", 1, 1, None, 12, None),
                                        ("fp32", "fp32, eager", 1, 1, None, 12, None)])).iloc[0]
    assert mixed["holds here"].startswith("not judged (runs of one precision ran different loops")
    old = ex.fidelity_verdict(_table([FAST, ("fp32", "unrecorded, unrecorded", 1, 1, None, 12, None)])).iloc[0]
    assert old["holds here"].startswith("not judged (a loop is not recorded")
    for fast_loop, ref_loop in (("bf16, eager", "fp32, eager"), ("bf16, graph", "fp32, graph"),
                                ("bf16, graph", "fp32, eager + graph")):  # a fallen-back graph; fast=True; mixed sittings
        v = ex.fidelity_verdict(_table([("auto", fast_loop, 3, 1, 0.1, 12, 0.5),
                                        ("fp32", ref_loop, 1, 1, None, 12, None)])).iloc[0]
        assert v["holds here"].startswith("not judged (the check compares a CUDA-graph step with fp32, eager")


def test_few_fast_seeds_say_within_noise_and_divergence_on_one_side_is_no():
    two = ex.fidelity_verdict(_table([("auto", "bf16, graph", 2, 1.4, 0.3, 12.25, 1.78),
                                      ("fp32", "fp32, eager", 1, 1.5, None, 14.0, None)])).iloc[0]
    assert two["holds here"] == "within noise (only 2 fast runs: the interval is too wide to say yes)"
    div = ex.fidelity_verdict(_table([FAST, ("fp32", "fp32, eager", 1, 1.5, None, 12.3, None)], diverged=[1, 0]))
    assert div.iloc[0]["holds here"] == "NO (1 of 4 fast runs diverged; the reference did not)"
    assert div.iloc[0]["fast"] == "bf16, graph: 12.20% ± 0.50 (3 runs, 1 diverged)"
    all_div = ex.fidelity_verdict(_table([("auto", "bf16, graph", 0, None, None, None, None),
                                          ("fp32", "fp32, eager", 1, 1.5, None, 12.3, None)], diverged=[3, 0]))
    assert all_div.iloc[0]["holds here"] == "NO (3 of 3 fast runs diverged; the reference did not)"
    ref_div = ex.fidelity_verdict(_table([FAST, ("fp32", "fp32, eager", 0, None, None, None, None)], diverged=[0, 1]))
    assert ref_div.iloc[0]["holds here"] == "NO (the reference diverged; the fast runs did not)"
    assert ref_div.iloc[0]["reference"] == "fp32, eager: no mean (0 runs, 1 diverged)"


def test_the_claims_table_carries_the_fidelity_verdict(tmp_path):
    base = tmp_path / "paper" / "08_fast_path_fidelity"
    base.mkdir(parents=True)
    _table([FAST, ("fp32", "fp32, eager", 1, 1.5, None, 13.5, None)]).to_csv(base / "table.csv", index=False)
    row = claims.check("paper", root=tmp_path).set_index("notebook").loc["08_fast_path_fidelity"]
    assert row["holds"] == "NO" and "reference fp32, eager: 13.50% (1 run)" in row["ours"]
    (base / "table.csv").unlink()
    assert claims.check("paper", root=tmp_path).set_index("notebook").loc["08_fast_path_fidelity", "holds"] == "not run"


def test_the_table_groups_by_what_each_run_asked_and_ran(tmp_path, monkeypatch):
    """Rows by precision asked and loop run (from the summaries); the reference config is fp32 and eager."""
    from resnet_lab.runs import METRIC_COLUMNS, runs_dir

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    cfgs = ex.with_dataset(ex.fidelity_configs("smoke", 20, [0, 1], [0]))
    assert [(c.precision, c.fast, c.seed) for c in cfgs] == [("auto", True, 0), ("auto", True, 1), ("fp32", False, 0)]
    for cfg, dtype, mode, err in zip(cfgs, ("bf16", "bf16", "fp32"), ("graph", "graph", "eager"), (0.12, 0.13, 0.125)):
        d = runs_dir() / cfg.hash
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
        (d / "summary.json").write_text(json.dumps({"status": "done", "steps_done": 2, "final_train_err": 0.02,
                                                    "final_test_err": err, "wall_seconds": 60.0, "device": "x",
                                                    "compute_dtype": dtype, "step_mode": mode, "params": 1, "flops": 1}))
        (d / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n" + "2,0.1,0.1,2.0,0.02,2.0,0.12,2\n")
    runs, curves, missing = ex.collect(cfgs)
    assert not missing
    t = ex.fidelity_table(runs)
    assert t[["precision", "loop", "runs"]].values.tolist() == [["auto", "bf16, graph", 2], ["fp32", "fp32, eager", 1]]
    assert t["test_err_%"].tolist() == pytest.approx([12.5, 12.5])
    assert ex.fidelity_verdict(t).iloc[0]["holds here"].startswith("within noise (only 2 fast runs")
    labelled = ex.fidelity_curves(runs, curves)
    assert sorted(labelled["loop"].unique()) == ["auto: bf16, graph", "fp32: fp32, eager"]
    with pytest.raises(ValueError, match="reference_seeds"):
        ex.fidelity_configs("smoke", 20, [0], [])


def test_a_loop_missing_from_older_summaries_reads_unrecorded():
    runs = pd.DataFrame({"compute_dtype": ["bf16", None, float("nan")], "step_mode": ["graph + eager", "eager", None]})
    assert ex._loops(runs).tolist() == ["bf16, graph + eager", "unrecorded, eager", "unrecorded, unrecorded"]
    assert ex._loops(pd.DataFrame({"status": ["done"]})).tolist() == ["unrecorded, unrecorded"]


def test_the_fast_runs_may_be_fp16_and_the_verdict_finds_their_precision():
    cfgs = ex.fidelity_configs("smoke", 20, [0, 1], [0], precision="fp16")
    assert [c.precision for c in cfgs] == ["fp16", "fp16", "fp32"]
    with pytest.raises(ValueError, match=r"precision='fp32' is not valid for the fast runs: use one of"):
        ex.fidelity_configs("smoke", 20, [0], [0], precision="fp32")
    fp16 = ("fp16", "fp16, graph", 3, 1.4, 0.3, 12.2, 0.5)
    ref = ("fp32", "fp32, eager", 1, 1.5, None, 12.9, None)
    v = ex.fidelity_verdict(_table([fp16, ref])).iloc[0]  # inferred: the one precision besides fp32
    assert v["holds here"] == "yes" and v["fast"].startswith("fp16, graph: 12.20%")
    both = _table([FAST, fp16, ref])
    assert ex.fidelity_verdict(both).iloc[0]["holds here"] == "not judged (fast runs of several precisions: auto, fp16; name one)"
    assert ex.fidelity_verdict(both, "fp16").iloc[0]["holds here"] == "yes"
    assert ex.fidelity_verdict(both, "auto").iloc[0]["fast"].startswith("bf16, graph")
