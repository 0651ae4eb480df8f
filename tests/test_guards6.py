"""What two docstring reviews and a contributor's walkthrough found the code did not do as it said: a run store
that names folders by hash must skip one whose config hashes elsewhere, curves keep every config column, a
kernel imports the checkout its sweep runs, a stopped run's caption says where it stopped, a Ctrl-C names the
runs it stopped, variants are named by their fields, and a field added to RunConfig keeps the stored hashes."""
import dataclasses
import json
import logging
import os
import types

import numpy as np
import pandas as pd
import pytest


def _store(root, cfg, status="done", steps=None, rows=2):
    """A run folder as train leaves it (config, summary, metrics), without training."""
    from resnet_lab.runs import METRIC_COLUMNS

    d = root / cfg.hash
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    steps = cfg.iterations if steps is None else steps
    (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": steps, "final_test_err": 0.5}))
    pd.DataFrame([[i + 1] + [0.5] * (len(METRIC_COLUMNS) - 1) for i in range(rows)],
                 columns=METRIC_COLUMNS).to_csv(d / "metrics.csv", index=False)
    return d


# -- the run store -----------------------------------------------------------------------------------------
def test_a_folder_whose_config_hashes_elsewhere_is_skipped_once_with_a_warning(results, caplog):
    """A run of another version of the code (a revised architecture, a field this one does not know) read as
    the config its JSON parses to here would be pooled with that config's runs as one more seed."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_runs

    good = make_config("smoke", depth=8)
    _store(results, good)
    other = _store(results, make_config("smoke", depth=8, seed=1))
    other.rename(results / "0123456789ab")
    with caplog.at_level(logging.WARNING, logger="resnet_lab.runs"):
        assert list(load_runs(results)["hash"]) == [good.hash]
        assert list(load_runs(results)["hash"]) == [good.hash]
    said = [r.getMessage() for r in caplog.records if "0123456789ab" in r.getMessage()]
    assert len(said) == 1 and "hashes to" in said[0]


def test_a_store_named_by_hand_that_is_not_one_says_so(tmp_path, caplog):
    from resnet_lab.runs import load_runs

    (tmp_path / "results" / "runs").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="resnet_lab.runs"):
        assert load_runs(tmp_path / "typo").empty
        assert load_runs(tmp_path / "results").empty
    text = caplog.text
    assert "no run store at" in text and str(tmp_path / "results" / "runs") in text


def test_curves_carry_every_config_column_stored_or_not(results):
    """Two runs that differ only in precision (08's reference loop) must not merge into one curve with a band."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_metrics

    a, b = make_config("smoke", depth=8), make_config("smoke", depth=8, precision="fp32")
    _store(results, a), _store(results, b)
    curves = load_metrics(results)
    assert set(curves.groupby("precision")["hash"].unique().map(tuple)) == {(a.hash,), (b.hash,)}
    assert (curves["milestones"] == a.milestones).all() and "width" in curves
    assert list(load_metrics(results, hash=[]).columns) == list(curves.columns)


def test_runs_filter_on_their_name(results):
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_runs

    a, b = make_config("smoke", depth=8), make_config("smoke", depth=8, arch="plain")
    _store(results, a), _store(results, b)
    assert list(load_runs(results, name="plain-8")["hash"]) == [b.hash]


# -- the config ---------------------------------------------------------------------------------------------
def test_a_whole_float_block_layers_is_refused_by_the_model_too():
    from resnet_lab.config import RunConfig
    from resnet_lab.models import build_model

    for make in (lambda: build_model("resnet", 20, block_layers=2.0), lambda: RunConfig(block_layers=2.0),
                 lambda: build_model("resnet", 20, block_layers=True)):
        with pytest.raises(ValueError, match=r"block_layers=.* is not valid: use one of \[1, 2, 3\]"):
            make()


def test_a_field_added_at_its_old_behaviour_keeps_every_stored_hash(monkeypatch):
    """How a new result field joins RunConfig (README: Extending): at its default the hash is the one before."""
    from resnet_lab import config
    from resnet_lab.config import RunConfig

    Scaled = dataclasses.make_dataclass("Scaled", [("shortcut_scale", float, 1.0)], bases=(RunConfig,), frozen=True)
    monkeypatch.setitem(config.ADDED_FIELDS, "shortcut_scale", 1.0)
    for kw in ({}, {"arch": "plain", "depth": 56}, {"arch": "preact", "seed": 3}):
        assert Scaled(**kw).hash == RunConfig(**kw).hash
        assert Scaled(**kw, shortcut_scale=0.5).hash != RunConfig(**kw).hash
    assert RunConfig(pad_fill="black").hash == "fcb22df1aed5"  # pad_fill: itself added this way (session 24)


def test_each_variant_is_named_by_its_fields_and_a_hand_config_by_its_name():
    from resnet_lab import experiments as ex
    from resnet_lab.config import make_config

    cfgs = ex.ablation_configs("smoke", list(ex.VARIANTS), [20], [0])
    rows = [{**c.to_json(), "name": c.name} for c in cfgs]
    assert [ex.variant_of(r) for r in rows] == list(ex.VARIANTS)
    odd = make_config("smoke", depth=20, block_layers=1, shortcut="B")
    assert ex.variant_of({**odd.to_json(), "name": odd.name}) == "resnet-20 skip1 B"  # not drawn as skip1's seed
    frame = pd.DataFrame([{**odd.to_json(), "bottleneck": float("nan")}])  # a row of a run from before the field
    assert ex.variant_of(frame.to_dict("records")[0]) != "bottleneck"


# -- what a reader is told ------------------------------------------------------------------------------------
def test_a_stopped_runs_caption_says_where_it_stopped(results):
    from resnet_lab import experiments as ex
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_runs

    done, cut = make_config("paper", depth=20), make_config("paper", depth=32)
    _store(results, done), _store(results, cut, status="running", steps=31_544)
    note = ex.runs_note(load_runs(results), stopped=True)
    assert "resnet-32: stopped at 31,544 of 64,000 iterations of batch 128 (164 epochs: 81 epochs done)" in note
    assert "resnet-20: 64,000 iterations of batch 128 (164 epochs)" in note


def test_a_ctrl_c_on_the_command_line_names_the_runs_it_stopped(monkeypatch, capsys):
    from resnet_lab import cli

    for raised, said in ((KeyboardInterrupt("stopped resnet-56 seed 1 at step 31,544, with a checkpoint"),
                          "interrupted (Ctrl-C): stopped resnet-56 seed 1 at step 31,544"),
                         (KeyboardInterrupt(), "resumes each run from its last checkpoint")):
        def stop(a, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "_train_one", stop)
        assert cli.main(["train", "--preset", "smoke", "--depth", "8"]) == cli.EXIT_INTERRUPTED
        assert said in capsys.readouterr().err


# -- the kernel a sweep or report starts ------------------------------------------------------------------------
def test_a_relative_pythonpath_reaches_the_kernel_absolute(tmp_path, monkeypatch):
    from resnet_lab import sweep

    env = sweep.absolute_path_env({"PYTHONPATH": f"src{os.pathsep}/abs/lib{os.pathsep}"}, cwd=tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "src"), "/abs/lib", str(tmp_path / ".")]
    assert sweep.absolute_path_env({"RESNET_LAB_DATA": ""}, cwd=tmp_path) == {"RESNET_LAB_DATA": ""}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ".")
    got = sweep.kernel_env()
    assert got["PYTHONPATH"] == str(tmp_path / ".") and got[sweep.PACKAGE_VAR] == str(sweep.package_dir())


def test_a_kernel_of_another_checkout_stops_at_its_first_call(monkeypatch, tmp_path):
    from resnet_lab import sweep

    params = {"preset": "smoke", "depths": [8], "seeds": [0], "device": "cpu", "train_missing": False}
    monkeypatch.setenv(sweep.PACKAGE_VAR, str(sweep.package_dir()))
    sweep.check_notebook("01_degradation", dict(params))
    monkeypatch.setenv(sweep.PACKAGE_VAR, str(tmp_path / "other" / "resnet_lab"))
    with pytest.raises(RuntimeError, match=r"imported resnet_lab from .*, but the sweep or report that started it runs "
                                           + str(tmp_path)):
        sweep.check_notebook("01_degradation", dict(params))


# -- the fast path's compile limit on older torch ------------------------------------------------------------------
def test_the_compile_limit_is_raised_under_torchs_older_names(monkeypatch):
    """torch before 2.7 names the settings cache_size_limit and fail_on_cache_limit_hit (pyproject allows 2.6)."""
    import torch._dynamo

    from resnet_lab import fast

    old = types.SimpleNamespace(cache_size_limit=8, fail_on_cache_limit_hit=False)
    monkeypatch.setattr(torch._dynamo, "config", old)
    fast._allow_many_nets()
    assert (old.cache_size_limit, old.fail_on_cache_limit_hit) == (fast.COMPILE_RECOMPILE_LIMIT, True)


# -- a notebook added (a second contributor's walkthrough) --------------------------------------------------------
def test_every_notebook_is_registered_where_notebooks_are_listed():
    """A notebook missing from NOTEBOOK_CONFIGS trains nothing in a sweep and loses the report's guard of its
    committed tables; missing from the test tables, it is never executed or checked by the suite."""
    from resnet_lab import experiments as ex
    from resnet_lab.report import notebooks

    from . import test_notebooks, test_params
    from .conftest import ROOT

    names = notebooks()
    assert set(ex.NOTEBOOK_CONFIGS) == set(names) == set(test_notebooks.OUTPUTS) == set(test_params.NOTEBOOKS)
    readme = (ROOT / "README.md").read_text()
    assert [n for n in names if f"| `{n}` |" not in readme] == []


def test_a_second_cached_analysis_is_read_under_its_own_kind(monkeypatch, cifar):
    """drawn_runs once read every cached analysis as 04's unravel one: a second notebook registered in
    NOTEBOOK_ANALYSES made it raise, which the report took for "cannot tell" and so redrew over its tables."""
    from resnet_lab import experiments as ex
    from resnet_lab.runs import RunDir, runs_dir

    cfgs = ex.with_dataset(ex.response_configs("smoke", [8], [0]))
    for c in cfgs:
        _store(runs_dir(), c)
    asked = []

    def read(self, kind, params):
        asked.append((kind, params))
        return {} if self.cfg.arch == "plain" else None

    monkeypatch.setattr(RunDir, "read_analysis", read)
    monkeypatch.setitem(ex.NOTEBOOK_ANALYSES, "06_layer_responses", ex.CachedAnalysis(
        lambda runs, p, device: None, "norms", ("max_images",), lambda max_images: {"n": max_images}))
    drawn, need = ex.drawn_runs("06_layer_responses", {"preset": "smoke", "depths": [8], "seeds": [0],
                                                        "max_images": 300})
    assert drawn == [c.hash for c in cfgs if c.arch == "plain"] and need == len(cfgs) == 2
    assert asked and all(a == ("norms", {"n": 300}) for a in asked)


def test_the_page_says_which_tables_its_provenance_comes_from(tmp_path):
    """06's tables can hold finished runs while 01-05 and 08 hold none: 'none finished' was false there."""
    from resnet_lab.page import _provenance

    (line,) = _provenance(tmp_path)
    assert "none finished" not in line and "01, 02, 03, 05, 08" in line


# -- a third contributor's walkthrough: a new preset ------------------------------------------------------------
def test_a_notebook_beside_grids_of_two_presets_is_refused_not_given_quick(capsys):
    from resnet_lab import cli

    from .conftest import ROOT

    grids = [str(ROOT / "sweeps" / g) for g in ("fidelity.yaml", "smoke_example.yaml")]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--sweep", grids[0], "--sweep", grids[1], "--notebook", "02_depth", "--list"])
    assert e.value.code == 2 and "presets ['paper', 'smoke']" in capsys.readouterr().err


# -- the official archive, at full size (a review that built one from the JPEG copy) ----------------------------------
def _official_tarball(path, n=20, dtype=np.uint8, mode="w:gz"):
    """A small official-format tarball (its batches made up: not the published bytes)."""
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8).astype(dtype)
            raw = pickle.dumps({b"data": x, b"labels": [i % 10 for i in range(n)]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    path.write_bytes(buf.getvalue())
    return path


def test_a_damaged_archive_is_refused_not_read_as_other_pixels(tmp_path):
    """tarfile stops at the archive's end marker and never reaches the gzip trailer, so a flipped byte inside a
    member loaded as changed pixels; a damaged deflate stream raised zlib.error, a traceback, not a DataError."""
    from resnet_lab.data import DataError, _load_official

    good = _official_tarball(tmp_path / "cifar-10-python.tar.gz")
    arrays, official = _load_official(good)
    assert arrays[0].shape == (100, 3, 32, 32) and not official
    data = bytearray(good.read_bytes())
    for where, mend in ((len(data) // 2, lambda d, i: d.__setitem__(slice(i, i + 64), b"\xff" * 64)),  # in a member
                        (len(data) // 3, lambda d, i: d.__setitem__(slice(i, i + 64), b"\xff" * 64)),  # its deflate
                        (len(data) - 8, lambda d, i: d.__setitem__(i, d[i] ^ 1))):  # the CRC itself
        bad = bytearray(data)
        mend(bad, where)
        (tmp_path / "bad.tar.gz").write_bytes(bytes(bad))
        with pytest.raises(DataError, match=r"bad\.tar\.gz' is truncated or corrupt"):
            _load_official(tmp_path / "bad.tar.gz")


def test_a_batch_of_other_pixels_than_uint8_is_refused_by_name(tmp_path):
    from resnet_lab.data import DataError, _load_official

    path = _official_tarball(tmp_path / "cifar-10-python.tar.gz", dtype=np.float32)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz/data_batch_1' holds float32 data; .* uint8"):
        _load_official(path)


def test_the_official_folder_is_found_from_its_parent_and_by_any_batch(tmp_path):
    from resnet_lab.data import DataError, load_cifar10, resolve_source

    inner = tmp_path / "root" / "cifar-10-batches-py"
    inner.mkdir(parents=True)
    (inner / "data_batch_2").write_bytes(b"")
    assert resolve_source(tmp_path / "root") == inner  # what torchvision's CIFAR10(root) is given
    with pytest.raises(DataError, match=r"is missing 'data_batch_1': not an extracted cifar-10-batches-py folder"):
        load_cifar10(tmp_path / "root", cache=False)


def test_a_cached_copy_says_the_path_this_load_was_given(tmp_path, monkeypatch):
    from resnet_lab import data

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)  # a small archive: its counts are not CIFAR-10's
    (tmp_path / "a").mkdir()
    first = _official_tarball(tmp_path / "a" / "cifar-10-python.tar.gz")
    stale = data._cache_file(data._sha256(first)[:16]).with_name(
        f"cifar10-{data._sha256(first)[:16]}-v{data.CACHE_VERSION - 1}.pt")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older decoder's copy")
    assert data.load_cifar10(first).info.path == str(first)
    assert not stale.exists()  # the older decoder's copy of the same source goes once the new one is written
    (tmp_path / "b").mkdir()
    second = tmp_path / "b" / "cifar-10-python.tar.gz"
    second.write_bytes(first.read_bytes())
    first.unlink()
    assert data.load_cifar10(second).info.path == str(second)  # read from the cache: not the deleted first


def test_an_xz_archive_damaged_is_a_data_error_too(tmp_path):
    from resnet_lab.data import DataError, _load_official

    good = _official_tarball(tmp_path / "c.tar.xz", mode="w:xz")
    bad = bytearray(good.read_bytes())
    bad[len(bad) // 2:len(bad) // 2 + 64] = b"\xff" * 64
    good.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="truncated or corrupt"):
        _load_official(good)


def test_torchvisions_root_gives_the_form_data_would_give_the_tarball_first(tmp_path):
    """torchvision leaves both forms in its root; data/ takes the tarball, so must the root (one dataset id)."""
    from resnet_lab.data import resolve_source

    root = tmp_path / "root"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-python.tar.gz").write_bytes(b"")
    assert resolve_source(root) == root / "cifar-10-python.tar.gz"


def _copy(path, source, version):
    """A decoded copy (tiny) as `load_cifar10` writes it, recording its source."""
    import torch

    from resnet_lab import data

    info = data.DataInfo("official", str(source), "0" * 64, False, 1, 1)
    z = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train_x": z, "train_y": torch.zeros(1, dtype=torch.long), "test_x": z,
                "test_y": torch.zeros(1, dtype=torch.long), "info": info.to_json()}, path)
    return path


def test_a_decoder_bump_keeps_the_offline_fallback_and_a_newer_copy(tmp_path, monkeypatch, caplog):
    """After `make reproduce` the CLI runs offline from the one decoded copy; a CACHE_VERSION bump made that copy
    an older one, ignored, and the CLI tried a download. Now its recorded source is decoded again, the older copy
    goes, and a newer decoder's copy (another checkout sharing the folder) stays."""
    from resnet_lab import data

    monkeypatch.delenv("RESNET_LAB_DATA", raising=False)
    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("tried a download"))
    src = _official_tarball(tmp_path / "elsewhere.tar.gz")
    key = data._sha256(src)[:16]
    cache = tmp_path / "d" / "cache"
    older = _copy(cache / f"cifar10-{key}-v{data.CACHE_VERSION - 1}.pt", src, data.CACHE_VERSION - 1)
    newer = _copy(cache / f"cifar10-{'f' * 16}-v{data.CACHE_VERSION + 1}.pt", src, data.CACHE_VERSION + 1)
    got = data.load_cifar10()
    assert got.info.path == str(src) and got.train_x.shape == (100, 3, 32, 32)
    assert not older.exists() and newer.exists() and data._cache_file(key).exists()


def test_an_older_copy_that_cannot_be_removed_costs_no_false_warning(tmp_path, monkeypatch, caplog):
    from pathlib import Path

    from resnet_lab import data

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)
    src = _official_tarball(tmp_path / "cifar-10-python.tar.gz")
    older = _copy(tmp_path / "d" / "cache" / f"cifar10-{data._sha256(src)[:16]}-v1.pt", src, 1)
    real = Path.unlink

    def refuse(self, *a, **k):
        if self == older:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level("WARNING"):
        data.load_cifar10(src)
    assert "cannot write" not in caplog.text and older.exists()
