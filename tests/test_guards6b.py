"""Guards a sixth mutation review found untested: a damaged image-folder tarball read to its end, the offline
fallback to an older decoder's copy (its source gone, two of them, two current copies), only this source's older
copies removed, a stray file in the cache, an image tree beside an official archive, a run store that is a file,
curves carrying their run's name and status, a missing bottleneck read as no variant, a point's kernel told the
package and PYTHONPATH, and a compile limit already above ours left alone."""
import io
import logging
import tarfile
import types

import numpy as np
import pandas as pd
import pytest

from .test_guards6 import _copy, _official_tarball, _store


class _Downloaded(Exception):
    """What the tests' `_download` raises: the load reached for the network."""


def _no_download(monkeypatch, tmp_path):
    """No source anywhere, the cache under tmp_path, and a download that raises _Downloaded with its argument."""
    from resnet_lab import data

    monkeypatch.delenv("RESNET_LAB_DATA", raising=False)
    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)

    def download(cached=()):
        raise _Downloaded(list(cached))

    monkeypatch.setattr(data, "_download", download)
    return tmp_path / "d" / "cache"


# -- the data ---------------------------------------------------------------------------------------------------
def test_a_damaged_image_folder_tarball_is_refused_too(tmp_path):
    """The JPEG copy's tarball is read to its end as the official one is: without it a flipped gzip CRC (or a
    changed byte in a member, which JPEG decodes as other pixels) loaded without a word."""
    from PIL import Image

    from resnet_lab.data import DataError, _iter_image_folder

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    raw = buf.getvalue()
    good = tmp_path / "jpeg.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        for split in ("train", "test"):
            info = tarfile.TarInfo(f"x/{split}/cat/0000.jpg")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert len(list(_iter_image_folder(good))) == 2
    bad = bytearray(good.read_bytes())
    bad[-8] ^= 1  # the gzip trailer's CRC
    (tmp_path / "bad.tar.gz").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"bad\.tar\.gz' is truncated or corrupt"):
        list(_iter_image_folder(tmp_path / "bad.tar.gz"))


def test_an_older_copy_whose_source_is_gone_leaves_the_download(tmp_path, monkeypatch):
    """Its recorded source deleted, the older copy has nothing to decode again: returning that path anyway made
    the load fail on a missing file instead of trying the download (or naming the copies)."""
    cache = _no_download(monkeypatch, tmp_path)
    from resnet_lab import data

    src = _official_tarball(tmp_path / "gone.tar.gz")
    _copy(cache / f"cifar10-{data._sha256(src)[:16]}-v{data.CACHE_VERSION - 1}.pt", src, data.CACHE_VERSION - 1)
    src.unlink()
    with pytest.raises(_Downloaded):
        data.load_cifar10()


def test_two_older_copies_are_not_a_choice_to_make(tmp_path, monkeypatch):
    """Two older decoders' copies of two sources: which one the offline fallback means is not ours to guess (the
    first in sorted order would silently change the dataset id of every later run)."""
    cache = _no_download(monkeypatch, tmp_path)
    from resnet_lab import data

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        src = _official_tarball(tmp_path / name / "cifar-10-python.tar.gz", n=20 if name == "a" else 21)
        _copy(cache / f"cifar10-{data._sha256(src)[:16]}-v{data.CACHE_VERSION - 1}.pt", src, data.CACHE_VERSION - 1)
    with pytest.raises(_Downloaded):
        data.load_cifar10()


def test_two_current_copies_name_themselves_not_an_older_copys_source(tmp_path, monkeypatch):
    """The fallback to an older copy is for no current copy at all: with two current ones the load stops naming
    them (too many to pick one), not decoding a third source from an older decoder's record."""
    cache = _no_download(monkeypatch, tmp_path)
    from resnet_lab import data

    src = _official_tarball(tmp_path / "old.tar.gz")
    _copy(cache / f"cifar10-{data._sha256(src)[:16]}-v{data.CACHE_VERSION - 1}.pt", src, data.CACHE_VERSION - 1)
    current = [_copy(data._cache_file(k * 16), src, data.CACHE_VERSION) for k in ("a", "b")]
    with pytest.raises(_Downloaded) as e:
        data.load_cifar10()
    assert e.value.args[0] == current


def test_only_this_sources_older_copies_are_removed(tmp_path, monkeypatch):
    """Writing the copy of one source removes that source's older copies, not another source's (still the offline
    fallback of whoever decoded it, or another checkout's)."""
    from resnet_lab import data

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)
    src = _official_tarball(tmp_path / "cifar-10-python.tar.gz")
    cache = tmp_path / "d" / "cache"
    mine = _copy(cache / f"cifar10-{data._sha256(src)[:16]}-v{data.CACHE_VERSION - 1}.pt", src, 1)
    other = _copy(cache / f"cifar10-{'e' * 16}-v{data.CACHE_VERSION - 1}.pt", tmp_path / "elsewhere", 1)
    data.load_cifar10(src)
    assert not mine.exists() and other.exists()


def test_a_stray_file_in_the_cache_is_not_an_older_copy(tmp_path, monkeypatch):
    """`cifar10-<key>-v2.bak.pt` (a copy kept by hand) matches the glob of decoded copies: its version is not a
    number, and reading it as one raised ValueError out of every load."""
    cache = _no_download(monkeypatch, tmp_path)
    from resnet_lab import data

    src = _official_tarball(tmp_path / "cifar-10-python.tar.gz")
    stray = _copy(cache / f"cifar10-{data._sha256(src)[:16]}-v2.bak.pt", src, 2)
    with pytest.raises(_Downloaded):
        data.load_cifar10()
    assert data.load_cifar10(src).info.path == str(src) and stray.exists()


def test_an_image_tree_beside_an_official_archive_is_the_tree(tmp_path):
    """Only a folder without train/ is torchvision's root: an image-folder tree that happens to hold the official
    archive too is the tree it was given (another dataset id, other pixels)."""
    from resnet_lab.data import resolve_source

    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cifar-10-python.tar.gz").write_bytes(b"")
    assert resolve_source(tmp_path / "tree") == tmp_path / "tree"


# -- the run store ------------------------------------------------------------------------------------------------
def test_a_run_store_that_is_a_file_reads_as_none_with_a_warning(tmp_path, caplog):
    from resnet_lab.runs import load_runs

    f = tmp_path / "runs.tar"
    f.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="resnet_lab.runs"):
        assert load_runs(f).empty
    assert f"no run store at {f}" in caplog.text


def test_curves_carry_their_runs_name_and_status(results):
    """plots.curves_figure draws hue='name' by default, and 05's curves are told apart by status."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import RUN_COLUMNS, load_metrics

    cfg = make_config("smoke", depth=8)
    _store(results, cfg, status="running", steps=1)
    curves = load_metrics(results)
    assert {"hash", "name", "status"} <= set(RUN_COLUMNS)
    assert set(curves["name"]) == {"resnet-8"} and set(curves["status"]) == {"running"}


def test_a_row_missing_its_bottleneck_is_no_variant():
    """A missing (NaN) bottleneck is unknown, not true: a projection-shortcut run read as the bottleneck variant
    would be drawn as that variant's seed."""
    from resnet_lab import experiments as ex
    from resnet_lab.config import make_config

    b = make_config("smoke", depth=20, shortcut="B")
    row = pd.DataFrame([{**b.to_json(), "name": b.name, "bottleneck": float("nan")}]).to_dict("records")[0]
    assert ex.variant_of(row) == "resnet-20 B"
    assert ex.variant_of({k: v for k, v in row.items() if k != "bottleneck"}) == "resnet-20 B"


# -- the kernel a sweep point starts ------------------------------------------------------------------------------
def test_a_points_kernel_is_told_the_package_and_an_absolute_pythonpath(tmp_path, monkeypatch):
    """_point_spec builds its env with kernel_env: with only RESNET_LAB_* a relative PYTHONPATH resolved from
    notebooks/, and the kernel's check of which resnet_lab it imported had nothing to compare with."""
    from resnet_lab import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "src")
    point = types.SimpleNamespace(notebook_path=tmp_path / "nb.ipynb", output=tmp_path / "out" / "nb-1.ipynb",
                                  params={"preset": "smoke"})
    env = sweep._point_spec(point, "python3", threads=1)["env"]
    assert env["PYTHONPATH"] == str(tmp_path / "src")
    assert env[sweep.PACKAGE_VAR] == str(sweep.package_dir())


# -- the fast path's compile limit --------------------------------------------------------------------------------
def test_a_compile_limit_set_higher_is_not_lowered(monkeypatch):
    """The limit is raised to COMPILE_RECOMPILE_LIMIT, never lowered: a user who set 1000 for a sweep of many
    shapes would hit it again."""
    import torch._dynamo

    from resnet_lab import fast

    for names in (("recompile_limit", "fail_on_recompile_limit_hit"), ("cache_size_limit", "fail_on_cache_limit_hit")):
        cfg = types.SimpleNamespace(**{names[0]: fast.COMPILE_RECOMPILE_LIMIT * 10, names[1]: False})
        monkeypatch.setattr(torch._dynamo, "config", cfg)
        fast._allow_many_nets()
        assert getattr(cfg, names[0]) == fast.COMPILE_RECOMPILE_LIMIT * 10 and getattr(cfg, names[1]) is True


# -- boundaries ---------------------------------------------------------------------------------------------------
def test_a_schedule_of_exactly_the_long_length_is_announced(cifar, tmp_path, caplog):
    """CPU_LONG_IMAGES is the length *from which* a CPU run is announced: 10,000 x 100 images is one."""
    from resnet_lab.config import make_config
    from resnet_lab.train import CPU_LONG_IMAGES, train_many

    cfg = make_config("quick", depth=8, iterations=10_000, batch_size=100, milestones=(5_000,))
    assert cfg.iterations * cfg.batch_size == CPU_LONG_IMAGES
    with caplog.at_level(logging.WARNING, logger="resnet_lab.train"):
        train_many([cfg], root=tmp_path, data=cifar, device="cpu", time_budget_s=0)
    assert "long schedule on the CPU" in caplog.text


def test_a_folder_one_character_off_its_hash_is_skipped(results):
    """The whole name is compared: a folder whose hash differs in its last character is another config's."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_runs

    cfg = make_config("smoke", depth=8)
    d = _store(results, cfg)
    d.rename(results / (cfg.hash[:-1] + ("0" if cfg.hash[-1] != "0" else "1")))
    assert load_runs(results).empty


def test_a_run_stopped_at_its_first_step_says_so(results):
    from resnet_lab import experiments as ex
    from resnet_lab.config import make_config
    from resnet_lab.runs import load_runs

    _store(results, make_config("paper", depth=20)), _store(results, make_config("paper", depth=32), "running", 1)
    assert "resnet-32: stopped at 1 of 64,000 iterations" in ex.runs_note(load_runs(results), stopped=True)


# -- the two product defects the round found ------------------------------------------------------------------------
def test_a_relative_source_is_recorded_absolute_so_another_folder_finds_it(tmp_path, monkeypatch):
    """`RESNET_LAB_DATA=../shared/...` (the README's form) was recorded as given: after a decoder bump, a process
    in another folder (a kernel in notebooks/) could not find the source again and reached for a download."""
    from resnet_lab import data

    cache = _no_download(monkeypatch, tmp_path)
    (tmp_path / "repo" / "notebooks").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    src = _official_tarball(tmp_path / "shared" / "c.tar.gz")
    monkeypatch.chdir(tmp_path / "repo")
    first = data.load_cifar10("../shared/c.tar.gz")
    assert first.info.path == str(src)
    key = data._sha256(src)[:16]
    data._cache_file(key).rename(cache / f"cifar10-{key}-v{data.CACHE_VERSION - 1}.pt")  # as a bump leaves it
    monkeypatch.chdir(tmp_path / "repo" / "notebooks")
    assert data.load_cifar10().info.path == str(src)


def test_an_older_copy_beside_the_current_one_goes_on_a_cache_hit(tmp_path, monkeypatch):
    """A checkout not yet updated, sharing the data folder, wrote its older copy after ours: 185 MB kept forever,
    since only a decode removed older copies."""
    from resnet_lab import data

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(data, "_validate", lambda *a: None)
    src = _official_tarball(tmp_path / "cifar-10-python.tar.gz")
    data.load_cifar10(src)
    older = _copy(tmp_path / "d" / "cache" / f"cifar10-{data._sha256(src)[:16]}-v{data.CACHE_VERSION - 1}.pt",
                  src, data.CACHE_VERSION - 1)
    data.load_cifar10(src)
    assert not older.exists() and data._cache_file(data._sha256(src)[:16]).exists()
