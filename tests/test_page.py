"""results/<preset>/RESULTS.md: written from the tables alone, every number as the table has it."""
import pandas as pd

from resnet_lab import claims, page


def _write(base, notebook, name, df):
    (base / notebook).mkdir(parents=True, exist_ok=True)
    df.to_csv(base / notebook / f"{name}.csv", index=False)


def test_the_page_shows_the_tables_numbers_and_names_what_is_missing(tmp_path):
    base = tmp_path / "paper"
    _write(base, "02_depth", "table", pd.DataFrame([
        dict(arch="resnet", depth=20, runs=2, params=269722, **{"train_err_%": 1.39, "train_err_ci95": 0.65,
             "test_err_%": 12.25, "test_err_ci95": 1.7789}, wall_min=4.54, packed=4, device="NVIDIA H200",
             **{"paper_test_err_%": 8.75}),
        dict(arch="resnet", depth=56, runs=1, params=853018, **{"train_err_%": 0.5, "train_err_ci95": None,
             "test_err_%": 7.0, "test_err_ci95": None}, wall_min=9.0, packed=4, device="NVIDIA H200",
             **{"paper_test_err_%": 6.97})]))
    (base / "02_depth" / "test_error_vs_depth.png").write_bytes(b"png")
    claims.check("paper", root=tmp_path)
    text = page.write_page("paper", root=tmp_path).read_text()
    assert "| 20 | 8.75 | 2 | 1.39 ± 0.65 | 12.25 ± 1.78 | 269,722 | 4.54 | 4 | NVIDIA H200 |" in text
    assert "| 56 | 6.97 | 1 | 0.50 | 7.00 | 853,018 |" in text  # one run: a mean, no interval
    assert "![test error vs depth, paper beside](02_depth/test_error_vs_depth.png)" in text
    assert "No `01_degradation/table.csv` rows yet" in text and "No `04_unraveled_ensemble/lesion_summary.csv`" in text
    assert "| 02_depth | ResNet-56 has lower test error than ResNet-20 |" in text  # the claims, as claims.csv
    assert "Devices: NVIDIA H200. CIFAR-10 copies (sha256): not recorded in these tables" in text


def test_the_page_names_the_devices_and_dataset_copies_from_the_tables(tmp_path):
    """From the tables' own columns (not a run store, which a clone lacks): the page reads the same anywhere."""
    base = tmp_path / "paper"
    row = dict(runs=1, params=1, wall_min=1.0, packed=1, **{"test_err_%": 9.0, "train_err_%": 1.0})
    _write(base, "01_degradation", "table", pd.DataFrame([
        dict(arch="plain", depth=20, device="NVIDIA H200", dataset="ff26949c34c4e67d", **row),
        dict(arch="resnet", depth=20, device="NVIDIA H200 + cpu (AMD EPYC, x86_64, 2 threads)",
             dataset="ff26949c34c4e67d, 0123456789abcdef", **row)]))
    text = page.build_page("paper", root=tmp_path)
    assert ("Devices: NVIDIA H200; cpu (AMD EPYC, x86_64, 2 threads). CIFAR-10 copies (sha256): "
            "`0123456789abcdef…`, `ff26949c34c4e67d…`." in text)
    assert "lossy" not in text  # tables from before the `pixels` column say nothing they cannot back
    _write(base, "02_depth", "table", pd.DataFrame([dict(depth=20, device="NVIDIA H200", dataset="ff26949c34c4e67d",
                                                         pixels="re-encoded", **row)]))
    assert "re-encoded (lossy, JPEG) copy of CIFAR-10, not the official pixels" in page.build_page("paper", root=tmp_path)
    empty = page.build_page("paper", root=tmp_path / "elsewhere")
    assert empty.count("Devices and CIFAR-10 copies: none recorded yet") == 1


def test_the_page_says_how_the_crops_were_padded_or_that_its_tables_predate_saying(tmp_path):
    """s25 audit A20: results/paper's tables came from runs that padded black (and evaluated in TF32), which its
    page did not say; padding moves absolute errors by points."""
    base = tmp_path / "paper"
    row = dict(runs=1, params=1, wall_min=1.0, packed=1, device="NVIDIA H200", **{"test_err_%": 9.0, "train_err_%": 1.0})
    _write(base, "01_degradation", "table", pd.DataFrame([dict(arch="plain", depth=20, **row)]))
    old = page.build_page("paper", root=tmp_path)
    assert "predate the crop-padding column" in old and "padded their crops black" in old and "Crops padded" not in old
    _write(base, "01_degradation", "table", pd.DataFrame([dict(arch="plain", depth=20, pad_fill="mean", **row)]))
    new = page.build_page("paper", root=tmp_path)
    assert "Crops padded with the mean colour (the paper's)." in new and "predate" not in new


def test_the_page_lists_runs_stopped_part_way_apart_from_the_tables(tmp_path):
    """05's ResNet-1202 trains over several GPU sessions: its progress shows, never averaged into a table."""
    base = tmp_path / "paper"
    _write(base, "05_thousand_layers", "unfinished", pd.DataFrame([dict(net="ResNet-1202", seed=0,
                                                                         steps_done=12_000, iterations=64_000)]))
    text = page.build_page("paper", root=tmp_path)
    assert "Stopped part-way (not averaged into any table):" in text
    assert "| ResNet-1202 | 0 | 12,000 | 64,000 |" in text


# -- review s24 (statistics and claims) -----------------------------------------------------------------------
_COLS = ["arch", "depth", "runs", "train_err_%", "train_err_ci95", "test_err_%", "test_err_ci95", "diverged"]


def test_the_run_tables_show_diverged_runs(tmp_path):
    """F2: `runs` counts the finished runs; a row of 1 run and 2 diverged must not read as one run."""
    base = tmp_path / "quick"
    _write(base, "01_degradation", "table", pd.DataFrame([("plain", 56, 1, 80.0, None, 80.0, None, 2)], columns=_COLS))
    section = page.build_page("quick", root=tmp_path).split("## Degradation")[1].split("## Depth")[0]
    assert "| net | depth | runs | diverged | train error % | test error % |" in section
    assert "| plain | 56 | 1 | 2 | 80.00 | 80.00 |" in section


def test_the_claims_off_the_paper_preset_carry_their_scope(tmp_path):
    """F4: RESULTS.md's claims for quick say that the claims are about converged nets and quick's are not."""
    for preset in ("quick", "paper"):
        _write(tmp_path / preset, "02_depth", "table", pd.DataFrame(
            [("resnet", 20, 1, 61.0, None, 59.1, None, 0), ("resnet", 56, 1, 65.7, None, 63.4, None, 0)],
            columns=_COLS))
        claims.check(preset, root=tmp_path)
    quick = page.build_page("quick", root=tmp_path).split("## Claims")[1].split("## Degradation")[0]
    assert "not converged" in quick and "describe early training only" in quick
    assert "converged" not in page.build_page("paper", root=tmp_path)


def test_the_lesion_and_effective_sections_say_what_their_numbers_are_over(tmp_path):
    """F3, F6, F9: the lesion median leaves downsampling blocks out (as the claims), tied worst blocks are named,
    and the effective range shows the share of the gradient it holds (at least 90%)."""
    from resnet_lab.experiments import lesion_summary

    base = tmp_path / "quick"
    les = pd.DataFrame([dict(block=b, stage=0, changes_shape=b == 3, has_shortcut=True, err=e, base_err=0.591,
                             net="ResNet-20", arch="resnet", depth=20, seed=0)
                        for b, e in enumerate([0.725, 0.725, 0.594, 0.9, 0.6])])
    _write(base, "04_unraveled_ensemble", "lesion_summary", lesion_summary(les))
    _write(base, "04_unraveled_ensemble", "effective", pd.DataFrame([dict(
        net="ResNet-20", arch="resnet", depth=20, seed=0, blocks=9, effective_from=1, effective_to=6,
        **{"share_of_paths_%": 90.82, "gradient_share_%": 95.31})]))
    text = page.build_page("quick", root=tmp_path)
    assert "| net | seeds | intact % | median lesion % (downsampling left out) | worst block |" in text
    assert "| ResNet-20 | 1 | 59.10 | 66.25 | 0, 1 | 72.50 | 90.00 |" in text
    assert "| ResNet-20 | 0 | 9 | 1 | 6 | 95.31 | 90.82 |" in text
    assert "carrying at least 90% of the gradient" in text


def test_layer_response_means_show_their_seed_spread(tmp_path):
    """F7: plain-56's 1.67 is the mean of 1.87, 2.20 and 0.94 (below ResNet-56's 1.11): the spread is beside it."""
    _write(tmp_path / "quick", "06_layer_responses", "summary", pd.DataFrame(
        [("plain-56", 1.868, 2.203, 0.944, 3, 1.672), ("ResNet-56", 1.11, None, None, 1, 1.11)],
        columns=["net", "seed 0", "seed 1", "seed 2", "seeds", "mean"]))
    section = page.build_page("quick", root=tmp_path).split("## Layer responses")[1].split("## ")[0]
    assert "| plain-56 | 3 | 1.67 | 0.94–2.20 |" in section and "| ResNet-56 | 1 | 1.11 | – |" in section
    assert "min–max over seeds" in section


def test_the_page_says_what_the_training_error_and_the_papers_spread_are(tmp_path):
    """F8, F9: the training error is a running error on augmented mini-batches; the paper's 6.61 ± 0.16 is a
    mean ± SD over 5 runs, beside our mean ± 95% CI."""
    text = page.build_page("paper", root=tmp_path)
    assert "Training error: the running error on the augmented training mini-batches over the last evaluation " \
           "interval, not the final model evaluated on the training set." in text
    depth = text.split("## Depth")[1].split("## ")[0]
    assert "6.61 ± 0.16 in the paper: mean ± SD over those 5 runs, not a 95% CI like ours" in depth
