"""Figures read on their own: each says which runs it draws and what its bands are; Fig. 7 and Veit's Fig. 3."""
import math

import pandas as pd
import pytest

from resnet_lab import experiments as ex, plots


def _runs(**over):
    base = dict(status="done", preset="quick", iterations=640, batch_size=32, train_subset=None, eval_subset=1000,
                split="full", name="resnet-20", seed=0)
    return {**base, **over}


def test_runs_note_names_the_schedule_seeds_and_evaluation_images():
    runs = pd.DataFrame([_runs(steps_done=640), _runs(seed=1, steps_done=640),
                         _runs(seed=2, status="running", steps_done=80)])  # stopped part-way: 05 draws it
    assert ex.runs_note(runs) == ("quick preset: 640 iterations of batch 32 (0.41 epoch); seeds 0, 1; "
                                  "errors on 1,000 test images")
    assert "seeds 0, 1, 2;" in ex.runs_note(runs, stopped=True)
    paper = pd.DataFrame([_runs(preset="paper", iterations=64_000, batch_size=128, eval_subset=None, name=n)
                          for n in ("resnet-110", "plain-110")])
    assert ex.runs_note(paper) == ("paper preset: 64,000 iterations of batch 128 (164 epochs); seed 0; "
                                   "errors on 10,000 test images")
    mixed = pd.DataFrame([_runs(name="resnet-56"), _runs(name="resnet-1202", iterations=6, batch_size=8,
                                                          train_subset=512, eval_subset=100)])
    # each schedule its own evaluation where they differ, and an epoch of a subset said to be one (6 steps of
    # 8 saw 48 images, not 9.4% of CIFAR-10)
    assert ex.runs_note(mixed) == ("quick preset: resnet-56: 640 iterations of batch 32 (0.41 epoch), errors on "
                                   "1,000 test images; resnet-1202: 6 iterations of batch 8 (0.094 epoch of a "
                                   "512-image subset), errors on 100 test images; seed 0")
    assert ex.runs_note(mixed, measured="std over 10 test images").endswith(
        "(0.094 epoch of a 512-image subset); seed 0; std over 10 test images")
    assert ex.runs_note(runs.iloc[:0]) == ""


def test_saved_figure_carries_its_note_and_its_bands(tmp_path):
    les = pd.DataFrame([dict(block=b, stage=0, changes_shape=b == 1, has_shortcut=a != "plain",
                             err=math.nan if (a == "plain" and b == 1) else 0.5, base_err=0.4, net=f"{a}-8",
                             arch=a, depth=8, seed=0) for a in ("plain", "resnet") for b in range(3)])
    fig = plots.lesion_figure(les)
    paths = plots.save(fig, tmp_path, "lesion", "quick preset: 6 iterations")
    assert [p.name for p in paths] == ["lesion.png", "lesion.pdf"]
    first = paths[0].read_bytes()
    assert plots.save(fig, tmp_path, "lesion", "quick preset: 6 iterations")[0].read_bytes() == first  # once
    text = fig._note_artist.get_text()
    assert "chance (90%)" in text and text.endswith("quick preset: 6 iterations")
    width = fig.get_tightbbox(fig._get_renderer()).width
    plots.save(fig, tmp_path, "long", "quick preset: " + "resnet-56: 640 iterations of batch 32; " * 12)
    assert fig.get_tightbbox(fig._get_renderer()).width == pytest.approx(width)  # wrapped, not wider
    plain = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "plain-8"][0]
    assert math.isnan(plain.get_ydata()[1])  # a gap where a plain net cannot lose the block, not a line across
    assert any(ln.get_ydata()[0] == plots.CHANCE_ERR for ln in fig.axes[0].get_lines())


def test_layer_responses_draw_every_seed_and_summarise_them():
    resp = pd.DataFrame([dict(layer=l, std=s * l, channels=16, rank=l, arch=a, depth=20, seed=s, net=f"{a}-20")
                         for a in ("plain", "resnet") for s in (1, 2) for l in (1, 2)])
    fig = plots.responses_figure(resp)
    drawn = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata())]  # not the legend's empty handles
    assert len(drawn) == 4  # one line per net and seed, not a mean per net
    t = ex.response_summary(resp).set_index("net")
    assert list(t.columns) == ["seed 1", "seed 2", "seeds", "mean"]
    assert t.loc["plain-20", "seed 2"] == pytest.approx(3.0) and t.loc["resnet-20", "mean"] == pytest.approx(2.25)
    t = ex.response_summary(resp[~((resp["net"] == "plain-20") & (resp["seed"] == 2))]).set_index("net")
    assert t.loc["plain-20", "seeds"] == 1 and t.loc["resnet-20", "seeds"] == 2  # a mean over fewer says so


def test_delete_k_curve_has_the_papers_k_and_the_figure_marks_its_reading():
    """Veit et al. read ResNet-110's delete-k curve at k = 10 (about 20% error): our k include 10 wherever the net
    has 10 blocks, and the figure of a 110-layer net marks the paper's point (not that of a 20-layer one)."""
    assert ex.delete_ks(54) == [0, 6, 10, 12, 18, 24, 30, 36, 42, 48, 54]
    assert ex.delete_ks(9) == list(range(10)) and 10 not in ex.delete_ks(9)

    def labels(depth):
        delete = pd.DataFrame([dict(k=k, draw=0, blocks="", err=0.1 + k / 100, net=f"ResNet-{depth}", arch="resnet",
                                    depth=depth, seed=0) for k in (0, 10)])
        fig = plots.deletion_figure(delete, delete.iloc[:0])
        return [line.get_label() for line in fig.axes[0].lines]

    assert "Veit et al. 2016 (≈)" in labels(110) and "Veit et al. 2016 (≈)" not in labels(20)


def test_paper_scale_curves_read_in_thousands_and_keep_bands_inside_0_to_100():
    """Two seeds (t = 12.7) of a noisy evaluation: a band past 0 or 100 would be drawn; the axis is
    fitted to the curves after their first tenth, so the last few % of error stay readable."""
    import numpy as np

    steps = [1000 * i for i in range(1, 65)]
    rows = [{"step": s, "train_err": 0.5 if s == 1000 else 0.02 + 0.0001 * seed, "arch": arch, "depth": 20,
             "seed": seed, "test_err": (0.02 if seed else 0.6) if s == 8000 else 0.12 + 0.001 * seed}
            for s in steps for seed in (0, 1) for arch in ("plain", "resnet")]
    fig = plots.degradation_figure(pd.DataFrame(rows))
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "20k" in labels and "40k" in labels
    assert ax.get_ylim() == (0, 40)  # 1.15 x the worst mean after 6.4k (31% at 8k), up to a multiple of 5
    bands = [p for a in fig.axes for p in a.collections]
    ys = np.concatenate([p.get_paths()[0].vertices[:, 1] for p in bands if p.get_paths()])
    assert ys.min() >= 0 and ys.max() <= 100


def test_curves_of_lines_that_share_a_name_fit_the_axis_each_and_no_error_means_no_figure():
    """Two learning rates of one net: the axis fits the worse line, not their average; errors all NaN
    (runs killed before their first evaluation) give the no-data figure rather than a seaborn error."""
    steps = [1000 * i for i in range(1, 11)]
    rows = [{"step": s, "train_err": e, "test_err": e, "name": "resnet-20", "lr": lr, "seed": 0}
            for s in steps for lr, e in ((0.1, 0.1), (0.01, 0.5))]
    fig = plots.curves_figure(pd.DataFrame(rows), hue="lr")
    assert fig.axes[0].get_ylim() == (0, 60)  # 1.15 x 50%, not 1.15 x 30%
    nan = pd.DataFrame([{**r, "train_err": float("nan"), "test_err": float("nan")} for r in rows])
    assert getattr(plots.curves_figure(nan, hue="lr"), "no_data", False)
    assert getattr(plots.degradation_figure(nan.assign(arch="resnet", depth=20)), "no_data", False)


def test_bars_take_the_order_asked_and_draw_only_what_has_runs():
    """03 passes its `variants` parameter as the order; variants without a finished run are left out of the
    axis, not drawn as empty slots."""
    runs = pd.DataFrame([dict(variant=v, depth=20, status="done", final_test_err=e)
                         for v, e in (("C", 0.1), ("A", 0.2), ("A", 0.21))])
    fig = plots.bars_figure(runs, x="variant", order=["A", "B", "C"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["A", "C"]


def test_numeric_curve_hues_are_categories_in_the_order_of_their_values():
    curves = pd.DataFrame([dict(step=s, train_err=0.5, test_err=0.5, depth=d, name=f"resnet-{d}", seed=0, arch="resnet",
                                status="done") for d in (110, 20) for s in (1, 2)])
    fig = plots.curves_figure(curves, hue="depth")
    labels = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else \
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels.index("20") < labels.index("110")


def test_a_grid_legend_stays_beside_its_axes_and_off_the_note_in_the_saved_image(tmp_path):
    """`bbox_inches="tight"` swaps the figure's box for the cropped one, which takes in the note under the axes:
    a legend anchored to that box's middle slid down over the note (03's ten variants hid its first line)."""
    import io

    names = [f"variant-{i}" for i in range(10)]
    curves = pd.DataFrame([dict(step=s, train_err=0.5 - 0.01 * i, test_err=0.55 - 0.01 * i, name=n, seed=0, depth=20)
                           for i, n in enumerate(names) for s in (1000, 2000, 3000)])
    fig = plots.curves_figure(curves, hue="name", col="depth")
    seen = {}

    def grab(event):
        seen["legend"] = fig.legends[0].get_window_extent(event.renderer)
        seen["note"] = fig._note_artist.get_window_extent(event.renderer)
        seen["axes"] = fig.axes[0].get_window_extent(event.renderer)

    fig.canvas.mpl_connect("draw_event", grab)
    plots.save(fig, tmp_path, "curves", "quick preset: 640 iterations of batch 32 (0.41 epoch); seeds 0, 1, 2; "
                                       "errors on 1,000 test images")
    fig.savefig(io.BytesIO(), bbox_inches="tight", dpi=100, format="png")  # the draw a saved file gets
    assert not seen["legend"].overlaps(seen["note"])
    middle = (seen["legend"].y0 + seen["legend"].y1) / 2
    assert seen["axes"].y0 < middle < seen["axes"].y1


def test_gates_of_several_seeds_are_one_line_per_net_with_its_band():
    """The note promises a band over seeds: `highway_gates` names a net without its seed, so seeds pool."""
    gates = pd.DataFrame([dict(block=b, mean_gate=0.1 * b + 0.01 * s, net=n, seed=s)
                          for n in ("highway-20", "gated-20") for s in (0, 1) for b in range(3)])
    fig = plots.gates_figure(gates)
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["gated-20", "highway-20"]
    assert len(fig.axes[0].collections) >= 2  # a band under each line


def test_captions_say_what_the_training_error_and_the_effective_range_are():
    """Review s24 F6, F8: every curves figure says its dashed line is a running error, and the shaded effective
    range holds at least 90% of the gradient (quick's holds 95.3%), not exactly 90%."""
    curves = pd.DataFrame([dict(step=s, train_err=0.5, test_err=0.5, depth=20, name="resnet-20", seed=0)
                           for s in (1, 2)])
    assert "training error (running mean since the last evaluation)" in " ".join(
        plots.curves_figure(curves, hue="depth")._note_lines)
    tag = dict(net="ResNet-8", arch="resnet", depth=8, seed=0)
    paths = pd.DataFrame([dict(k=k, paths=1, share=0.25, **tag) for k in range(4)])
    grad = pd.DataFrame([dict(k=k, sample=0, grad_norm=1.0, total=t, **tag)
                         for k, t in enumerate([1.0, 6.0, 2.0, 1.0])])
    eff = pd.DataFrame([dict(effective_from=1, effective_to=2, **tag)])
    fig = plots.paths_figure(paths, grad, eff)
    assert "at least 90% of the gradient" in fig.axes[2].get_xlabel()


def test_a_line_or_bar_is_the_seeds_of_one_config_or_the_figure_is_refused():
    """A frame from `load_metrics(preset=...)` holds every variant: drawn by depth alone, option A and C
    ResNet-20s would be averaged into one line with a band, as if they were seeds. The tables refuse that
    (`analysis._check_seeds_only`); so do the figures, naming the field, and a hue on it draws them apart."""
    steps = [1000 * i for i in range(1, 5)]
    rows = [{"step": s, "lr": 0.1 if s < 3000 else 0.01, "train_err": 0.3, "test_err": 0.3, "arch": "resnet",
             "depth": 20, "shortcut": sc, "seed": seed, "compile": seed == 1, "name": "resnet-20"}
            for s in steps for sc in ("A", "C") for seed in (0, 1)]
    curves = pd.DataFrame(rows)
    with pytest.raises(ValueError, match=r"differ in \{'shortcut': \['A', 'C'\]\}.*one config"):
        plots.degradation_figure(curves)
    with pytest.raises(ValueError, match="shortcut"):
        plots.curves_figure(curves, hue="depth")
    one = curves[curves["shortcut"] == "A"]  # seeds of one config, one compiled (speed only): drawn
    assert not getattr(plots.degradation_figure(one), "no_data", False)
    assert len(plots.curves_figure(curves, hue="shortcut").axes) == 1  # the differing field as the hue
    assert len(plots.curves_figure(curves, hue="depth", col="shortcut").axes) == 2
    runs = curves.drop_duplicates(["shortcut", "seed"]).assign(status="done", final_test_err=0.1)
    with pytest.raises(ValueError, match="shortcut"):
        plots.depth_figure(runs)
    with pytest.raises(ValueError, match="shortcut"):
        plots.bars_figure(runs, x="arch")
    plots.bars_figure(runs, x="shortcut")
    plots.depth_figure(runs[runs["shortcut"] == "C"])
    with pytest.raises(ValueError, match=r"no column \['depht'\] to draw by: the frame has \[.*'depth'"):
        plots.curves_figure(curves, hue="depht")  # a typo, not a pooling of configs: said as such
