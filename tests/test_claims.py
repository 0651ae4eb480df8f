"""The claims table: verdicts computed from the stored tables, with the criterion beside each."""
import pandas as pd
import pytest

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
    _write(base, "01_degradation", "table", _ci_table([
        ("plain", 20, 3, 2.0, 0.3, 9.5, 0.3), ("plain", 56, 3, 4.0, 0.3, 13.5, 0.3),
        ("resnet", 20, 3, 1.0, 0.2, 8.8, 0.3), ("resnet", 56, 3, 0.5, 0.2, 7.0, 0.3)]))
    _write(base, "02_depth", "table", _ci_table([("resnet", 20, 3, 1.0, 0.2, 8.8, 0.3), ("resnet", 56, 3, 0.5, 0.2, 7.0, 0.3)]))
    lesion = (lesion_rows("ResNet-110", "resnet", 110, 0.065, [0.07, 0.3, 0.068], shape_blocks=(1,))
              + lesion_rows("plain-110", "plain", 110, 0.1, [0.9, 0.9, 0.85]))
    _write(base, "04_unraveled_ensemble", "lesion", pd.DataFrame(lesion))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([dict(
        net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=5, effective_to=17)]))
    _write(base, "08_fast_path_fidelity", "table", pd.DataFrame(
        [("auto", "bf16, graph", 3, 1.4, 0.3, 12.2, 0.5), ("fp32", "fp32, eager", 1, 1.5, None, 12.6, None)],
        columns=["precision", "loop", "runs", "train_err_%", "train_err_ci95", "test_err_%", "test_err_ci95"]))
    t = claims.check("paper", root=tmp_path)
    assert list(t["holds"]) == ["yes"] * 7, t.to_string()
    assert "block 0 +0.50 points" in t.loc[3, "ours"]  # the downsampling block 1 (+23.5) is left out
    assert (base / "claims.md").read_text().count("| yes |") == 7

    _write(base, "02_depth", "table", _table([("resnet", 20, 3, 1.0, 7.0), ("resnet", 56, 3, 0.5, 8.8)]))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([dict(
        net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=20, effective_to=40)]))
    t = claims.check("paper", root=tmp_path)
    assert t.loc[2, "holds"] == "not judged"  # tables from before the CI columns: no noise, no verdict; the row says so
    assert t.loc[2, "ours"] == "20: 7.00%, 56: 8.80% (seed noise not estimated: no CI column in the table)"
    assert t.loc[5, "holds"] == "NO" and "20-40 of 54" in t.loc[5, "ours"]


def test_missing_tables_and_runs_are_not_run_rather_than_a_verdict(tmp_path):
    base = tmp_path / "quick"
    _write(base, "01_degradation", "table", _table([("plain", 20, 1, 2.0, 9.5), ("plain", 56, 0, None, None)]))
    t = claims.check("quick", root=tmp_path)
    assert set(t["holds"]) == {"not run"} and len(t) == 7
    # a table that exists but lacks a net says which, rather than reading as a missing table
    assert list(t.loc[:1, "ours"]) == ["no finished plain-56 in the table",
                                       "no finished resnet-20 or resnet-56 in the table"]
    assert t.loc[2, "ours"] == ""  # 02's table is missing


def test_each_criterion_says_what_its_verdict_does():
    """'not higher' needs the whole CI under its margin: a lower mean inside wide noise is not a yes (review s24
    F5), and the criterion states the margin."""
    t = claims.degradation(_ci_table([("resnet", 20, 3, 10.0, 3.0, 12.0, 1.0), ("resnet", 56, 3, 9.5, 3.0, 11.0, 1.0),
                                      ("plain", 20, 3, 10.0, 3.0, 12.0, 1.0), ("plain", 56, 3, 10.5, 3.0, 13.0, 1.0)]))
    plain, resnet = t
    assert plain["holds"] == "within noise" and "inside its 95% CI (Welch) is 'within noise'" in plain["criterion"]
    assert resnet["holds"] == "within noise" and "-0.50 ±" in resnet["ours"]  # lower, but the CI reaches past +1
    assert "else 'yes' where its upper end is at most +1 point (the margin)" in resnet["criterion"]
    assert "'NO' where the CI lies wholly above 0" in resnet["criterion"]
    assert "inside its 95% CI (Welch) is" not in resnet["criterion"]
    assert all("no noise estimate (one run on a side), or a diverged run on a side: 'not judged'" in r["criterion"]
               for r in t)
    narrow = claims.degradation(_ci_table([("resnet", 20, 3, 10.0, 0.3, 12.0, 1.0),
                                           ("resnet", 56, 3, 9.5, 0.3, 11.0, 1.0)]))[1]
    assert narrow["holds"] == "yes"


def _ci_table(rows):
    """Summary rows (arch, depth, runs, train %, train CI, test %, test CI), as `analysis.summarize` writes them."""
    return pd.DataFrame(rows, columns=["arch", "depth", "runs", "train_err_%", "train_err_ci95", "test_err_%",
                                       "test_err_ci95"])


def test_difference_is_welchs_interval_of_the_raw_seeds():
    from resnet_lab.analysis import summarize, t975

    a, b = [0.085, 0.087, 0.086], [0.070, 0.072, 0.069, 0.075]
    runs = pd.DataFrame([dict(arch="resnet", depth=d, status="done", params=1, flops=1, final_train_err=0.0,
                              final_test_err=e) for d, errs in ((20, a), (56, b)) for e in errs])
    t = summarize(runs, ["arch", "depth"]).set_index("depth", drop=False)
    diff, half = claims.difference(t.loc[20], t.loc[56], "test_err_%")
    va, vb = pd.Series(a).var() / 3, pd.Series(b).var() / 4  # squared standard errors, straight from the seeds
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert diff == pytest.approx(100 * (sum(b) / 4 - sum(a) / 3))
    assert half == pytest.approx(100 * t975(dof) * (va + vb) ** 0.5)  # at Welch's fractional dof, not rounded
    assert claims.verdict(diff, half, "lower") == "yes" and claims.verdict(diff, half, "higher") == "NO"
    assert claims.verdict(-diff, half, "not higher") == "NO" and claims.verdict(diff / 10, half, "lower") == "within noise"
    # "not higher": lower or equal holds, above the noise fails, above but inside it is unsure either way
    assert [claims.verdict(d, 1.0, "not higher") for d in (-0.5, 0.0, 0.5, 1.5)] == ["yes", "yes", "within noise",
                                                                                   "NO"]
    # no noise estimate: never a verdict, whatever the sign of the difference (review s24 F1)
    assert [claims.verdict(d, None, e) for d in (-0.5, 0.5) for e in ("higher", "lower", "not higher")] == [
        "not judged"] * 6


def test_a_difference_inside_its_noise_is_neither_yes_nor_no(tmp_path):
    base = tmp_path / "paper"
    # plain: +0.3 points with CIs of ±0.5 each; ResNet-56 0.2 higher, also inside noise; depth: 56 better by 1.8 ± ~0.4
    _write(base, "01_degradation", "table", _ci_table([
        ("plain", 20, 3, 2.0, 0.5, 9.5, 0.3), ("plain", 56, 3, 2.3, 0.5, 9.9, 0.3),
        ("resnet", 20, 3, 1.0, 0.4, 8.8, 0.3), ("resnet", 56, 3, 1.2, 0.4, 7.0, 0.3)]))
    _write(base, "02_depth", "table", _ci_table([("resnet", 20, 3, 1.0, 0.4, 8.8, 0.3),
                                                ("resnet", 56, 3, 1.2, 0.4, 7.0, 0.3)]))
    t = claims.check("paper", root=tmp_path)
    # ResNet-56 0.2 higher, +0.20 ± 0.37: inside the noise, and the whole CI under the 1-point margin: no higher
    assert list(t["holds"][:3]) == ["within noise", "yes", "yes"], t.to_string()
    assert t.loc[0, "ours"].startswith("20: 2.00 ± 0.50%, 56: 2.30 ± 0.50%; 56 - 20: +0.30 ± ")
    assert "within noise" in (base / "claims.md").read_text()
    # the same means from one seed each: no verdict (the two runs' order is one draw), and the row says why
    _write(base, "01_degradation", "table", _ci_table([
        ("plain", 20, 1, 2.0, 0.0, 9.5, 0.0), ("plain", 56, 1, 2.3, 0.0, 9.9, 0.0),
        ("resnet", 20, 1, 1.0, 0.0, 8.8, 0.0), ("resnet", 56, 1, 1.2, 0.0, 7.0, 0.0)]))
    t = claims.check("paper", root=tmp_path)
    assert list(t["holds"][:2]) == ["not judged", "not judged"]
    assert "`not judged` that there is no noise estimate" in (base / "claims.md").read_text()
    assert t.loc[0, "ours"] == "20: 2.00%, 56: 2.30% (seed noise not estimated: one run on a side)"


@pytest.mark.parametrize("dof, q", [  # scipy.stats.t.ppf(0.975, dof)
    (1, 12.706204736174694), (1.5, 6.016663104427929), (2, 4.302652729749462), (2.5, 3.5746548420036817),
    (2.853, 3.2772515916535347), (4.7, 2.62072607535317), (10, 2.228138851986274), (100, 1.9839715185235518),
    (1000, 1.9623390808264083)])
def test_t975_is_the_exact_quantile_at_any_dof(dof, q):
    from resnet_lab.analysis import t975

    assert t975(dof) == pytest.approx(q, rel=1e-9)


@pytest.mark.parametrize("dof", [0.1, 0.2, 0.5])
def test_t975_below_one_dof_is_still_the_quantile(dof):
    """Below 1 dof the quantile passes any fixed bracket (about 1.7e12 at 0.1): the tail there is 2.5%."""
    from resnet_lab.analysis import _t_tail, t975

    assert _t_tail(t975(dof), dof) == pytest.approx(0.025, rel=1e-6)


def test_each_residual_net_gets_its_own_lesion_verdict(tmp_path):
    """Two residual nets at one depth: each is judged on its own blocks (pooled, the worst net's block would
    name the verdict and the other's result would be lost)."""
    base = tmp_path / "paper"
    _write(base, "04_unraveled_ensemble", "lesion", pd.DataFrame(
        lesion_rows("ResNet-110", "resnet", 110, 0.06, [0.062, 0.062, 0.062])
        + lesion_rows("pre-act ResNet-110", "preact", 110, 0.06, [0.09, 0.062, 0.062])))
    t = claims.check("paper", root=tmp_path).set_index("claim")
    rows = t[t.index.str.startswith("single-block deletions")]
    assert dict(zip(rows.index, rows["holds"])) == {
        "single-block deletions barely hurt ResNet-110 (not at downsampling)": "yes",
        "single-block deletions barely hurt pre-act ResNet-110 (not at downsampling)": "NO"}
    assert "block 0 +3.00 points" in rows.loc["single-block deletions barely hurt pre-act ResNet-110 "
                                              "(not at downsampling)", "ours"]


def test_a_plain_net_collapses_only_near_chance_and_well_above_its_intact_error(tmp_path):
    base = tmp_path / "paper"
    lesion = (lesion_rows("plain-56", "plain", 56, 0.85, [0.86, 0.87, 0.86])  # never learned: no collapse to see
              + lesion_rows("plain-56 B", "plain", 56, 0.12, [0.90, 0.89, 0.91])
              + lesion_rows("plain-20", "plain", 20, 0.1, [0.2, 0.2, 0.2]))  # not the deepest: not judged
    _write(base, "04_unraveled_ensemble", "lesion", pd.DataFrame(lesion))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([
        dict(net=n, arch=a, depth=110, seed=0, blocks=54, effective_from=5, effective_to=hi)
        for n, a, hi in (("ResNet-110", "resnet", 17), ("preact-110", "preact", 30))]))
    t = claims.check("paper", root=tmp_path).set_index("claim")
    assert t.loc["plain-56 collapses when one block is deleted", "holds"] == "NO"
    assert t.loc["plain-56 collapses when one block is deleted", "ours"] == "median 86.0% (intact 85.0%, +1.0 points)"
    assert t.loc["plain-56 B collapses when one block is deleted", "holds"] == "yes"
    # three seeds, intact 80/60/60%, every deletion 86%: the rise is over the seeds' mean intact error
    seeds = [r | {"seed": s, "base_err": b} for s, b in ((0, 0.8), (1, 0.6), (2, 0.6))
             for r in lesion_rows("plain-56", "plain", 56, 0.0, [0.86, 0.86, 0.86])]
    _write(base, "04_unraveled_ensemble", "lesion", pd.DataFrame(seeds))
    t = claims.check("paper", root=tmp_path).set_index("claim")
    assert t.loc["plain-56 collapses when one block is deleted", "ours"] == "median 86.0% (intact 66.7%, +19.3 points)"
    assert t.loc["plain-56 collapses when one block is deleted", "holds"] == "yes"
    paths = t[t.index.str.startswith("the gradient comes from paths")]  # one verdict per net, each its own
    assert dict(zip(paths.index, paths["holds"])) == {
        "the gradient comes from paths much shorter than the net (ResNet-110)": "yes",
        "the gradient comes from paths much shorter than the net (preact-110)": "NO"}
    # a second seed whose range reaches past m/2: the claim holds only if it holds for every seed
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([
        dict(net="ResNet-110", arch="resnet", depth=110, seed=s, blocks=54, effective_from=5, effective_to=hi)
        for s, hi in ((0, 17), (1, 28))]))
    t = claims.check("paper", root=tmp_path).set_index("claim")
    row = t.loc["the gradient comes from paths much shorter than the net (ResNet-110)"]
    assert row["holds"] == "NO" and row["ours"] == "effective 5-17, 5-28 of 54 blocks (m/2 = 27)"


def test_verdict_names_a_bad_expectation():
    with pytest.raises(ValueError, match=r"expect='above' is not valid: use one of higher, lower, not higher"):
        claims.verdict(1.0, 0.5, "above")


def test_the_degradation_notebooks_verdicts_are_the_claims_verdicts():
    from resnet_lab.experiments import degradation_claims

    t = _ci_table([("plain", 20, 3, 2.0, 0.2, 9.5, 0.3), ("plain", 32, 3, 2.1, 0.2, 9.5, 0.3),
                   ("plain", 56, 3, 4.0, 0.2, 13.5, 0.3), ("resnet", 20, 3, 1.0, 0.4, 8.8, 0.3),
                   ("resnet", 56, 3, 1.6, 0.4, 7.0, 0.3), ("resnet", 110, 0, None, None, None, None)])
    d = degradation_claims(t).set_index("arch")
    assert d.loc["plain", "deep"] == "56: 4.0%" and d.loc["plain", "holds here"] == "yes"
    assert d.loc["resnet", "deep"] == "56: 1.6%"  # 110 has no finished run: not the deepest
    assert d.loc["resnet", "holds here"] == "NO" and d.loc["resnet", "deep - shallow (95% CI)"].startswith("+0.60 ± ")
    one = degradation_claims(t[t["depth"] == 20]).set_index("arch")  # the paper runs as they arrive
    assert one.loc["plain", "holds here"] == "not run (runs that finished without diverging at 20 layers only)"


# -- review s24 (statistics and claims) -----------------------------------------------------------------------
_DIV = ["arch", "depth", "runs", "train_err_%", "train_err_ci95", "test_err_%", "test_err_ci95", "diverged"]


def test_one_run_a_side_is_not_judged():
    """F1: with one seed a side the noise is unknown: a 0.1-point difference is no verdict, in the claims or in
    01's notebook table."""
    from resnet_lab.experiments import degradation_claims

    t = pd.DataFrame([("resnet", 20, 1, 1.0, None, 8.8, None, 0), ("resnet", 56, 1, 1.2, None, 8.7, None, 0),
                      ("plain", 20, 1, 1.0, None, 8.8, None, 0), ("plain", 56, 1, 1.1, None, 9.0, None, 0)],
                     columns=_DIV)
    row = claims.depth(t)[0]
    assert row["holds"] == "not judged" and "(seed noise not estimated: one run on a side)" in row["ours"]
    assert [r["holds"] for r in claims.degradation(t)] == ["not judged", "not judged"]
    assert list(degradation_claims(t)["holds here"]) == ["not judged", "not judged"]


def test_diverged_runs_are_named_beside_the_means_they_are_not_in():
    """F2: two of three ResNet-56 seeds diverged: the row says so, and the lone survivor gives no verdict."""
    t = pd.DataFrame([("resnet", 20, 3, 2.0, 0.5, 9.0, 0.5, 0), ("resnet", 56, 1, 1.9, None, 8.9, None, 2),
                      ("plain", 20, 3, 2.0, 0.5, 9.0, 0.5, 0), ("plain", 56, 0, None, None, None, None, 3)],
                     columns=_DIV)
    plain, resnet = claims.degradation(t)
    assert resnet["ours"].endswith("; ResNet-56: 2 of 3 runs diverged, not in the mean"), resnet
    assert resnet["holds"] == "not judged"
    assert plain["holds"] == "not run"
    assert plain["ours"] == "no finished plain-56 in the table (plain-56: 3 of 3 runs diverged, not in the mean)"
    assert "diverged" not in claims.depth(t.assign(diverged=0))[0]["ours"]  # none diverged: nothing said


def test_01s_own_table_gives_no_verdict_beside_a_diverged_run():
    """s25 audit A4: 01's claims cell judged the survivors while claims.md said `not judged`; one diverged
    plain-56 seed of four makes both say `not judged` and name the run."""
    from resnet_lab.experiments import degradation_claims

    t = pd.DataFrame([("plain", 20, 3, 2.0, 0.2, 9.0, 0.5, 0), ("plain", 56, 3, 4.0, 0.2, 13.0, 0.5, 1),
                      ("resnet", 20, 3, 2.0, 0.2, 9.0, 0.5, 0), ("resnet", 56, 3, 1.5, 0.2, 8.0, 0.5, 0)],
                     columns=_DIV)
    d = degradation_claims(t).set_index("arch")
    assert d.loc["plain", "holds here"] == "not judged (plain-56: 1 of 4 runs diverged, not in the mean)"
    assert claims.degradation(t)[0]["holds"] == "not judged"
    assert d.loc["resnet", "holds here"] == "yes"  # its side: none diverged


def test_verdicts_off_the_paper_preset_say_the_claims_are_about_converged_nets(tmp_path):
    """F4: quick's nets see 0.4 epoch; its claims.md says what its verdicts describe, paper's says nothing."""
    for preset in ("quick", "paper"):
        _write(tmp_path / preset, "02_depth", "table", _ci_table([("resnet", 20, 1, 61.0, None, 59.1, None),
                                                                  ("resnet", 56, 1, 65.7, None, 63.4, None)]))
        claims.check(preset, root=tmp_path)
    quick = (tmp_path / "quick" / "claims.md").read_text()
    assert ("**Scope: the `quick` nets are not converged (640 iterations of batch 32, 0.41 epoch).**" in quick
            and "claims about converged nets" in quick and "describe early training only" in quick)
    assert "converged" not in (tmp_path / "paper" / "claims.md").read_text()


def test_not_higher_needs_its_whole_interval_under_the_margin():
    """F5: -0.01 ± 10 points is absence of evidence, not a yes; the margin is 1 point, inclusive."""
    assert claims.NOT_HIGHER_MARGIN_PTS == 1.0
    assert claims.verdict(-0.01, 10.0, "not higher") == "within noise"
    assert claims.verdict(-0.5, 1.5, "not higher") == "yes"  # upper end +1.0: at the margin
    assert claims.verdict(-0.5, 1.6, "not higher") == "within noise"
    assert claims.verdict(0.5, 0.2, "not higher") == "NO"  # above 0 beyond its noise: higher, if by under the margin
    assert claims.verdict(0.5, 1.5, "not higher") == "within noise"  # might be above by more than the margin


def test_training_error_criteria_say_what_the_training_error_is():
    """F8: the running error on augmented mini-batches, not the final model evaluated on the training set."""
    t = _ci_table([("plain", 20, 3, 2.0, 0.3, 9.5, 0.3), ("plain", 56, 3, 4.0, 0.3, 13.5, 0.3)])
    assert "running error on the augmented training mini-batches" in claims.degradation(t)[0]["criterion"]
    assert "mini-batches" not in claims.depth(t)[0]["criterion"]  # test error: evaluated, nothing to add


def _seeded(net, arch, seed, base_err, errs, down=()):
    return [r | {"seed": seed} for r in lesion_rows(net, arch, 20, base_err, errs, shape_blocks=down)]


def test_plain_collapse_median_is_the_lesion_summarys_median():
    """F3: per-block means over seeds, then the median: 70%, not the 90% of all seeds' rows pooled."""
    from resnet_lab.experiments import lesion_summary

    df = pd.DataFrame(_seeded("plain-20", "plain", 0, 0.3, [0.9, 0.9, 0.9])
                      + _seeded("plain-20", "plain", 1, 0.3, [0.5, 0.5, 0.9]))
    row = [r for r in claims.lesions(df) if "plain-20" in r["claim"]][0]
    med = float(lesion_summary(df).set_index("net").loc["plain-20", "median_err_excl_downsampling_%"])
    assert med == pytest.approx(70.0) and row["ours"].startswith(f"median {med:.1f}%") and row["holds"] == "NO"


def test_resnet_lesion_median_is_over_the_lesion_summarys_blocks():
    """F3: the summary's median leaves the downsampling block out, as the claim does: +1.50, not +2.00."""
    from resnet_lab.experiments import lesion_summary

    df = pd.DataFrame(_seeded("ResNet-20", "resnet", 0, 0.10, [0.10, 0.11, 0.50, 0.12, 0.13], down=(2,)))
    s = lesion_summary(df).iloc[0]
    row = [r for r in claims.lesions(df) if "ResNet-20" in r["claim"]][0]
    cost = s["median_err_excl_downsampling_%"] - s["intact_err_%"]
    assert cost == pytest.approx(1.5) and f"median +{cost:.2f}" in row["ours"]


def test_tied_worst_blocks_are_all_named():
    """F9: quick's ResNet-20 has blocks 0 and 1 both at +13.4: the claim and the summary name both."""
    from resnet_lab.experiments import lesion_summary

    df = pd.DataFrame(_seeded("ResNet-20", "resnet", 0, 0.591, [0.725, 0.725, 0.594, 0.6], down=(3,)))
    row = claims.lesions(df)[0]
    assert row["ours"].startswith("worst: blocks 0, 1 +13.40 points")
    s = lesion_summary(df).iloc[0]
    assert s["worst_blocks"] == "0, 1" and s["worst_block"] == 0


def test_the_effective_paths_claim_says_how_much_gradient_its_range_holds():
    """F6: the range holds at least 90% (quick's 1-6: 95.3%): said where the table has the column."""
    eff = pd.DataFrame([dict(net="ResNet-20", arch="resnet", depth=20, seed=0, blocks=9, effective_from=1,
                             effective_to=6, **{"share_of_paths_%": 90.8, "gradient_share_%": 95.31})])
    row = claims.effective_paths(eff)[0]
    assert row["ours"] == "effective 1-6 of 9 blocks (m/2 = 4.5); holding 95.3% of the gradient"
    assert "at least 90% of the gradient" in row["criterion"]


def test_a_diverged_seed_beside_finished_ones_leaves_the_claim_not_judged():
    """Review s24-diff F3: with 1 of 3 ResNet-56 seeds diverged, the two survivors' mean must not say 'yes'."""
    t = pd.DataFrame([("resnet", 20, 3, 2.0, 0.2, 9.0, 0.2, 0), ("resnet", 56, 2, 1.0, 0.2, 7.0, 0.2, 1)],
                     columns=_DIV)
    row = claims.depth(t)[0]
    assert row["holds"] == "not judged" and "ResNet-56: 1 of 3 runs diverged" in row["ours"]
    assert claims.depth(t.assign(diverged=0))[0]["holds"] == "yes"  # the same means without it: judged


def test_01s_table_says_not_judged_where_the_deepest_net_diverged_in_every_seed():
    """s25 diff review F4: with every plain-56 seed diverged, 01's cell compared plain-20 with plain-44 and said
    `yes`, while claims.md said `not run`; it names the lost net instead."""
    from resnet_lab.experiments import degradation_claims

    t = pd.DataFrame([("plain", 20, 3, 2.0, 0.2, 9.0, 0.5, 0), ("plain", 44, 3, 4.0, 0.2, 13.0, 0.5, 0),
                      ("plain", 56, 0, None, None, None, None, 3)], columns=_DIV)
    d = degradation_claims(t).set_index("arch")
    assert d.loc["plain", "holds here"] == "not judged (plain-56: 3 of 3 runs diverged, not in the mean)"


def test_a_table_is_read_back_bit_for_bit(tmp_path):
    """The verdicts are drawn from floats the notebooks wrote: under pandas 2 a plain pd.read_csv reads about
    one in five 1 ulp off, so a verdict at its threshold could differ between pandas versions."""
    import numpy as np

    x = np.random.default_rng(1).lognormal(0, 2, 2000)
    _write(tmp_path, "02_depth", "table", pd.DataFrame({"depth": range(len(x)), "test_err_%": x}))
    back = claims.read_table(tmp_path, "02_depth", "table")["test_err_%"].to_numpy()
    assert back.dtype == np.float64 and (back == x).all(), int((back != x).sum())
