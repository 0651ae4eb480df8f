"""Guards a fifth mutation review found untested (part B): each test fails against the code with that line
changed (where a claim's verdict sits at its bounds and what it says without a noise estimate, which nets and
rows a claim reads, what an analysis leaves of the model it measured, which rows a table keeps, what an image
folder's layout, cache and pixels are, what the page links and warns of and how it is written, which analysis
files a store names and imports, and how a gate learns, a net starts and checkpointing splits it)."""
import io
import json
import logging
import math
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image


# -- claims: the numbers a verdict rests on --------------------------------------------------------------
def _row(runs, mean, ci, depth=20):
    return pd.Series({"depth": depth, "runs": runs, "test_err_%": mean, "test_err_ci95": ci})


def test_a_side_without_a_ci_value_has_no_noise_estimate():
    """Summaries from before final_train_err existed give a NaN CI beside runs >= 2: the means decide and the row
    says why, rather than a NaN half-width that makes every comparison 'within noise'."""
    from resnet_lab import claims

    a, b = _row(3, 10.0, 0.5), _row(3, 12.0, float("nan"), depth=56)
    diff, half = claims.difference(a, b, "test_err_%")
    assert diff == pytest.approx(2.0) and half is None
    assert claims.compare_text(a, b, "test_err_%", diff, half).endswith("(seed noise not estimated: no CI value)")


def test_seeds_that_agree_exactly_have_a_zero_interval_not_an_unknown_one():
    """Every seed at 0.00% training error (a ResNet on the paper preset): the noise is measured and is zero."""
    from resnet_lab import claims

    a, b = _row(3, 0.0, 0.0), _row(3, 0.5, 0.0, depth=56)
    diff, half = claims.difference(a, b, "test_err_%")
    assert (diff, half) == (0.5, 0.0)
    assert claims.compare_text(a, b, "test_err_%", diff, half).endswith("56 - 20: +0.50 ± 0.00 points")


def test_one_run_has_no_prediction_interval():
    """A table written when one run's CI was 0.0: one seed says nothing about the spread of the next."""
    from resnet_lab.claims import prediction_half_width

    assert prediction_half_width(_row(1, 12.0, 0.0), "test_err_%") is None
    assert prediction_half_width(_row(2, 12.0, 1.0), "test_err_%") is not None


def test_a_difference_exactly_at_its_half_width_is_within_noise():
    """The 95% interval of the difference then touches zero: not shown to be above, nor below."""
    from resnet_lab.claims import NOISE, verdict

    assert verdict(1.0, 1.0, "higher") == verdict(-1.0, 1.0, "lower") == NOISE
    assert verdict(-1.0, 1.0, "higher") == verdict(1.0, 1.0, "lower") == NOISE
    assert verdict(1.0, 1.0, "not higher") == NOISE


def _lesion(net, arch, depth, base_err, errs, seed=0):
    return [dict(block=b, stage=0, changes_shape=False, has_shortcut=arch != "plain", err=e, base_err=base_err,
                 net=net, arch=arch, depth=depth, seed=seed) for b, e in enumerate(errs)]


def _holds(rows):
    return {r["claim"]: r["holds"] for r in rows}


def test_each_lesion_and_path_criterion_holds_at_its_stated_bound():
    """'< 1 point' fails at exactly 1 point; 'median lesion error >= 80%' holds at exactly 80%; 'below m/2' fails
    at exactly m/2 (27 of 54 blocks)."""
    from resnet_lab import claims

    got = _holds(claims.lesions(pd.DataFrame(_lesion("ResNet-110", "resnet", 110, 0.0, [0.01, 0.0])
                                             + _lesion("plain-110", "plain", 110, 0.1, [0.8, 0.8, 0.8]))))
    assert got["single-block deletions barely hurt ResNet-110 (not at downsampling)"] == "NO"
    assert got["plain-110 collapses when one block is deleted"] == "yes"
    eff = pd.DataFrame([dict(net="ResNet-110", arch="resnet", depth=110, seed=0, blocks=54, effective_from=5,
                             effective_to=27)])
    assert _holds(claims.effective_paths(eff)) == {
        "the gradient comes from paths much shorter than the net (ResNet-110)": "NO"}


def test_the_collapse_claim_reads_the_deepest_plain_net_only():
    """04's quick grid has plain-20 beside plain-110: the claim is about the deep net, as the residual one is."""
    from resnet_lab import claims

    rows = (_lesion("plain-20", "plain", 20, 0.1, [0.2, 0.2, 0.2])
            + _lesion("plain-110", "plain", 110, 0.1, [0.9, 0.9, 0.9]))
    got = {k: v for k, v in _holds(claims.lesions(pd.DataFrame(rows))).items() if "collapses" in k}
    assert got == {"plain-110 collapses when one block is deleted": "yes"}


def test_a_table_with_a_header_and_no_rows_reads_as_missing(tmp_path):
    """A notebook run before any of its nets were writes the columns only: its claims are 'not run' with nothing
    to show, and the page says the table has no rows yet rather than drawing an empty one."""
    from resnet_lab import claims, page

    base = tmp_path / "paper" / "01_degradation"
    base.mkdir(parents=True)
    pd.DataFrame(columns=["arch", "depth", "runs", "train_err_%", "test_err_%"]).to_csv(base / "table.csv",
                                                                                        index=False)
    t = claims.check("paper", root=tmp_path)
    assert list(t.loc[:1, "holds"]) == ["not run", "not run"] and list(t.loc[:1, "ours"]) == ["", ""]
    assert "No `01_degradation/table.csv` rows yet" in page.build_page("paper", root=tmp_path)


# -- analysis: what a measurement leaves behind, which rows a table keeps ----------------------------------
def test_layer_responses_and_gate_means_leave_the_model_as_they_found_it():
    """Both run the net in eval mode with hooks: a model in training mode stays so, and no hook stays behind
    (a left hook would keep reading, and a left eval mode would train on BN's running statistics)."""
    from resnet_lab.analysis import gate_means, layer_responses
    from resnet_lab.models import build_model

    x, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    for arch, measure in (("resnet", layer_responses), ("highway", gate_means)):
        m = build_model(arch, 8).train()
        measure(m, [(x, y)])
        assert m.training and all(mod.training for mod in m.modules()), arch
        assert not any(mod._forward_hooks for mod in m.modules()), arch


def test_counting_macs_leaves_a_training_model_training():
    from resnet_lab.analysis import count_macs
    from resnet_lab.models import build_model

    m = build_model("resnet", 8).train()
    count_macs(m)
    assert m.training and all(mod.training for mod in m.modules())


def test_a_forward_backward_timing_runs_the_net_in_training_mode():
    """forward+backward is a training step's cost: BN in eval mode would time another computation."""
    from resnet_lab.analysis import time_model
    from resnet_lab.models import build_model

    seen = []
    m = build_model("resnet", 8)
    m.stem.register_forward_hook(lambda mod, _i, _o: seen.append(mod.training))
    time_model(m, 2, image_size=32, repeats=1, backward=True)
    time_model(m, 2, image_size=32, repeats=1, backward=False)
    assert seen == [True, True, False, False]


def test_a_table_keeps_rows_whose_key_is_missing_and_names_the_copy_as_runs_do():
    """train_subset None is the full training set: grouping by it must keep those runs (pandas drops NaN keys by
    default). The dataset column is the 16-hex id a run's config names (dataset_id), not a shorter prefix."""
    from resnet_lab.analysis import summarize

    sha = "ff26949c34c4e67d" + "0" * 48
    runs = pd.DataFrame({"arch": ["resnet"] * 4, "depth": [20] * 4, "train_subset": [None, None, 5000, 5000],
                         "status": ["done"] * 4, "params": [1] * 4, "flops": [1] * 4,
                         "final_train_err": [0.01] * 4, "final_test_err": [0.08, 0.10, 0.2, 0.22],
                         "dataset_sha256": [sha] * 4})
    t = summarize(runs, ["arch", "depth", "train_subset"])
    assert t["runs"].tolist() == [2, 2] and t["test_err_%"].tolist() == pytest.approx([21.0, 9.0])
    assert set(t["dataset"]) == {"ff26949c34c4e67d"}


# -- data: image-folder layouts, the cache, the pixels --------------------------------------------------
def _png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder_tar(path, offset=0, prefix=""):
    """One PNG per class and split, class c's pixels all c*10+offset; `prefix` the archive's top folder."""
    from resnet_lab.data import CLASSES

    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, name in enumerate(CLASSES):
                raw = _png(c * 10 + offset)
                info = tarfile.TarInfo(f"{prefix}{split}/{name}/0000.png")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """A 10/10-image CIFAR-10 (one image per class) is what load_cifar10 validates, in a fresh data dir."""
    from resnet_lab import data as D

    monkeypatch.setattr(D, "N_TRAIN", 10)
    monkeypatch.setattr(D, "N_TEST", 10)
    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "data"))
    return D


def test_an_image_folder_without_a_top_folder_is_read(tiny_cifar, tmp_path):
    """`tar -C cifar10 -czf x.tar.gz train test`, or the extracted folder itself: paths are train/<class>/x."""
    D = tiny_cifar
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for c, name in enumerate(D.CLASSES):
            (tree / split / name).mkdir(parents=True)
            (tree / split / name / "0000.png").write_bytes(_png(c * 10))
    for src in (tree, _folder_tar(tmp_path / "flat.tar.gz")):
        got = D.load_cifar10(src, cache=False)
        assert got.train_y.tolist() == list(range(10)) and got.test_x[:, 0, 0, 0].tolist() == list(range(0, 100, 10))


def test_an_image_folder_copy_is_cached_by_its_contents_and_never_counts_as_official_pixels(tiny_cifar, tmp_path,
                                                                                            caplog, monkeypatch):
    """The cache is keyed by the source's sha256: a new copy at the same path is decoded, not served stale;
    cache=False reads no cache; a damaged cache is decoded again; and a JPEG/PNG folder is never 'official'."""
    D = tiny_cifar
    src = _folder_tar(tmp_path / "cifar10.tar.gz")
    first = D.load_cifar10(src)
    assert first.info.kind == "image-folder" and first.info.official_pixels is False
    assert int(first.train_x[1, 0, 0, 0]) == 10
    _folder_tar(src, offset=3)  # another copy, same name
    assert int(D.load_cifar10(src).train_x[1, 0, 0, 0]) == 13
    cache = D._cache_file(D._sha256(src)[:16])
    cache.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        assert int(D.load_cifar10(src).train_x[1, 0, 0, 0]) == 13
    assert "ignoring unreadable cache" in caplog.text

    def no_cache(_path):
        raise AssertionError("cache=False read the cache")

    monkeypatch.setattr(D, "_read_cache", no_cache)
    assert int(D.load_cifar10(src, cache=False).train_x[1, 0, 0, 0]) == 13


def test_normalize_keeps_one_mean_per_device_and_dtype(monkeypatch):
    """The bf16 step and the fp32 evaluation share a device: each gets its own dtype back."""
    from resnet_lab import data as D

    monkeypatch.setattr(D, "_NORM", {})
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert D.normalize(x).dtype == torch.float32
    assert D.normalize(x, torch.bfloat16).dtype == torch.bfloat16
    assert D.normalize(x).dtype == torch.float32


# -- page: links, warnings, provenance, the write ---------------------------------------------------------
def _table(base, notebook, **extra):
    (base / notebook).mkdir(parents=True, exist_ok=True)
    pd.DataFrame([dict(arch="resnet", depth=20, runs=1, params=10_000, wall_min=1.0, packed=1,
                       **{"train_err_%": 1.0, "test_err_%": 9.0}, **extra)]).to_csv(base / notebook / "table.csv",
                                                                                     index=False)


def test_the_page_links_only_figures_that_exist_and_groups_thousands_from_10000(tmp_path):
    from resnet_lab import page

    base = tmp_path / "paper"
    _table(base, "01_degradation", device="cpu")
    text = page.build_page("paper", root=tmp_path)
    assert "degradation.png" not in text  # the table is there, its figure not yet
    assert "| resnet | 20 | 1 | 1.00 | 9.00 | 10,000 |" in text


def test_official_pixels_get_no_lossy_copy_warning(tmp_path):
    from resnet_lab import page

    base = tmp_path / "paper"
    _table(base, "02_depth", device="cpu", dataset="0123456789abcdef", pixels="official")
    assert "lossy" not in page.build_page("paper", root=tmp_path)


@pytest.mark.parametrize("notebook", ["01_degradation", "02_depth", "03_shortcut_ablations"])
def test_the_pages_devices_come_from_each_run_table(tmp_path, notebook):
    """03's ablations may be the only runs of a session (guards3 covers 05 and 08)."""
    from resnet_lab import page

    _table(tmp_path / "paper", notebook, device="NVIDIA H200", dataset="ff26949c34c4e67d")
    assert "Devices: NVIDIA H200." in page.build_page("paper", root=tmp_path)


def test_a_reader_of_the_old_page_reads_it_whole_while_it_is_rebuilt(tmp_path):
    """RESULTS.md is replaced, not rewritten in place: a reader (a web server, an editor) that opened it before
    a rebuild gets the old page whole, never a truncated or mixed one."""
    from resnet_lab import page

    path = page.write_page("paper", root=tmp_path)
    old = path.read_text()
    with open(path) as reader:
        _table(tmp_path / "paper", "01_degradation", device="cpu")
        page.write_page("paper", root=tmp_path)
        assert reader.read() == old
    assert path.read_text() != old


# -- runs and transfer: which analysis files exist and travel ----------------------------------------------
def test_an_analysis_kind_is_lowercase_letters_only(tmp_path):
    """The kind is part of a file name inside the run folder: '../x' or 'Unravel' would leave the names that
    exports carry (runs.ANALYSIS_FILE)."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import RunDir

    rd = RunDir(make_config("smoke"), tmp_path)
    for bad in ("../x", "Unravel", "un-ravel", ""):
        with pytest.raises(ValueError, match="analysis kind"):
            rd.analysis_file(bad, {})


def test_an_import_refuses_an_analysis_name_with_anything_after_json(tmp_path):
    from resnet_lab.transfer import import_runs

    from .test_transfer_safety import B, H, archive, config_bytes, make_run, member, A

    store = tmp_path / "store"
    make_run(store, B, "done", 6)
    for name in ("analysis-unravel-0123456789ab.json.sh", f"analysis-unravel-0123456789ab.json/../../{B.hash}"):
        part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)), member(f"{H}/{name}", b"{}")])
        with pytest.raises(ValueError, match="is not a run file"):
            import_runs([part], root=store)


def _analysed_run(tmp_path):
    import hashlib

    from resnet_lab.config import make_config
    from resnet_lab.runs import RunDir

    rd = RunDir(make_config("smoke"), tmp_path)
    rd.path.mkdir(parents=True)
    rd.model_file.write_bytes(b"weights")
    return rd, hashlib.sha256(b"weights").hexdigest()


def test_a_store_that_cannot_be_written_still_gets_its_analysis(tmp_path, monkeypatch, caplog):
    """Hours of lesions on a read-only store: the tables are returned (and computed again next time)."""
    from resnet_lab import runs

    rd, sha = _analysed_run(tmp_path)

    def read_only(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runs, "atomic_write_json", read_only)
    with caplog.at_level(logging.WARNING):
        got = rd.write_analysis("unravel", {"draws": 1}, {"lesion": pd.DataFrame({"err": [0.1]})}, sha)
    assert got["lesion"]["err"].tolist() == [0.1] and "not cached" in caplog.text


def test_a_cached_record_without_tables_is_computed_again(tmp_path):
    """A record of this model and these parameters whose 'tables' is not a mapping reads as absent, not a crash."""
    rd, sha = _analysed_run(tmp_path)
    rd.write_analysis("unravel", {"draws": 1}, {"lesion": pd.DataFrame({"err": [0.1]})}, sha)
    assert rd.read_analysis("unravel", {"draws": 1})["lesion"]["err"].tolist() == [0.1]
    f = rd.analysis_file("unravel", {"draws": 1})
    for tables in (None, ["lesion"]):
        f.write_text(json.dumps({**json.loads(f.read_text()), "tables": tables}))
        assert rd.read_analysis("unravel", {"draws": 1}) is None


# -- models: how a gate learns, how a net starts, how checkpointing splits it -----------------------------
def test_a_gate_learns_from_the_shortcut_it_scales():
    """gated: out = F(x) + (1 - g) * s(x), so g's only gradient comes through the shortcut; highway: T*F + (1-T)*s,
    whose gate gradient is (F - s) T (1 - T), not F's side alone."""
    from resnet_lab.models import build_model

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    gated = build_model("gated", 8).blocks[0]
    gated(x).sum().backward()
    assert gated.gate.weight.grad is not None and gated.gate.weight.grad.abs().sum() > 0
    hw = build_model("highway", 8).blocks[0]
    hw(x).sum().backward()
    got = hw.gate.bias.grad.clone()
    hw.zero_grad()
    f, s, t = hw.branch(x), hw.shortcut(x), torch.sigmoid(hw.gate(x))
    torch.relu(t * f + (1 - t) * s).sum().backward()
    assert torch.allclose(got, hw.gate.bias.grad, atol=1e-6)


def test_convs_start_kaiming_normal_over_their_fan_out():
    """He et al.'s (and torchvision's) init: std sqrt(2 / (k*k*out)); over fan-in the 3->16 stem would start
    2.3 times wider (sqrt(2/27) against sqrt(2/144))."""
    from resnet_lab.models import build_model

    torch.manual_seed(0)
    w = build_model("resnet", 8).stem[0].weight
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.15)


@pytest.mark.parametrize("depth, seg", [(20, 2), (32, 2), (56, 1)])
def test_activation_checkpointing_makes_at_most_its_segments(depth, seg, monkeypatch):
    """activation_checkpointing=s is s segments per stage, 3s in all: more, smaller groups save no memory and
    cost a checkpoint each."""
    from resnet_lab import models

    calls = []
    real = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    m = models.build_model("resnet", depth, activation_checkpointing=seg).train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert 0 < len(calls) <= 3 * seg


def test_a_configs_gate_bias_reaches_its_model():
    from resnet_lab.config import make_config
    from resnet_lab.models import model_from_config

    m = model_from_config(make_config("smoke", arch="highway", gate_bias=-1.0))
    assert all(torch.equal(b.gate.bias, torch.full_like(b.gate.bias, -1.0)) for b in m.blocks)
