import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lab import data as D
from resnet_lab.data import DataError, DeviceLoader, augment, load_cifar10, normalize

from .conftest import needs_data


@needs_data
def test_jpeg_tarball_is_full_cifar10(cifar):
    assert cifar.train_x.shape == (50_000, 3, 32, 32) and cifar.train_x.dtype == torch.uint8
    assert cifar.test_x.shape == (10_000, 3, 32, 32)
    assert cifar.train_y.bincount().tolist() == [5_000] * 10
    assert cifar.test_y.bincount().tolist() == [1_000] * 10
    assert cifar.info.kind == "image-folder" and not cifar.info.official_pixels
    assert len(cifar.info.sha256) == 64
    # the shared copy's README: per-channel mean (0.4913, 0.4821, 0.4465)
    mean = (cifar.train_x.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-3)


@needs_data
def test_labels_follow_the_official_order(cifar):
    # Official order: airplane=0 ... truck=9. Class 'ship' (8) images are bluer than 'frog' (6) ones.
    blue_minus_green = lambda c: (cifar.train_x[cifar.train_y == c, 2].float() - cifar.train_x[cifar.train_y == c, 1].float()).mean()
    assert blue_minus_green(8) > blue_minus_green(6) + 10
    assert D.CLASSES[8] == "ship" and D.CLASSES[6] == "frog"


@needs_data
def test_cache_is_reused(cifar, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(D, "_load_image_folder", boom)
    again = load_cifar10()
    assert torch.equal(again.test_x, cifar.test_x) and again.info == cifar.info
    monkeypatch.setattr(D, "CACHE_VERSION", D.CACHE_VERSION + 1)  # a new decoder never reads an old cache
    with pytest.raises(AssertionError, match="decoded again"):
        load_cifar10()


# -- bad sources ---------------------------------------------------------------------------------
def _jpeg(size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _image_tar(path, classes=10, size=32, per_class=1, names=D.CLASSES):
    with tarfile.open(path, "w:gz") as tar:
        raw = _jpeg(size)
        for split in ("train", "test"):
            for c in names[:classes]:
                for i in range(per_class):
                    info = tarfile.TarInfo(f"x/{split}/{c}/{i:04d}.jpg")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return path


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nope.tar.gz")


def test_wrong_class_count(tmp_path):
    with pytest.raises(DataError, match="3 classes.*CIFAR-10 has 10"):
        load_cifar10(_image_tar(tmp_path / "a.tar.gz", classes=3), cache=False)


def test_class_folders_must_have_cifar10_names(tmp_path):
    """Folder names give the labels: 'car' for 'automobile' would sort after 'bird' and shift labels."""
    names = ("airplane", "car", *D.CLASSES[2:])
    with pytest.raises(DataError, match=r"class folders \['car'\] in train/.*airplane, automobile, bird"):
        load_cifar10(_image_tar(tmp_path / "a.tar.gz", names=names), cache=False)


def test_wrong_image_size(tmp_path):
    with pytest.raises(DataError, match="64x64.*32x32"):
        load_cifar10(_image_tar(tmp_path / "a.tar.gz", size=64), cache=False)


def test_wrong_split_sizes(tmp_path):
    with pytest.raises(DataError, match="10 train images; CIFAR-10 has 50000"):
        load_cifar10(_image_tar(tmp_path / "a.tar.gz"), cache=False)


def test_macos_appledouble_entries_are_not_images(tmp_path):
    """A tarball made on a Mac holds `__MACOSX/.../._name.jpg` metadata beside each image: skipped, not counted
    (10 images, not 20) and not decoded (which would fail as a corrupt image)."""
    path = _image_tar(tmp_path / "a.tar.gz")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w:gz") as tar:
        for m, raw in members:
            tar.addfile(m, io.BytesIO(raw))
            folder, name = m.name.rsplit("/", 1)
            junk = b"\x00\x05\x16\x07 AppleDouble"
            for twin in (f"__MACOSX/{folder}/._{name}", f"{folder}/._{name}"):
                info = tarfile.TarInfo(twin)
                info.size = len(junk)
                tar.addfile(info, io.BytesIO(junk))
    with pytest.raises(DataError, match="has 10 train images; CIFAR-10 has 50000"):
        load_cifar10(path, cache=False)


def test_truncated_archive(tmp_path):
    good = _image_tar(tmp_path / "a.tar.gz", per_class=20).read_bytes()
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_cifar10(bad, cache=False)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="not a readable tar archive") as e:
        load_cifar10(junk, cache=False)
    assert "\n" not in str(e.value) and "accepted: cifar-10-python.tar.gz" in str(e.value)  # one line, what to give


def _official_dir(tmp_path, n_train=50_000, side=32):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", 10_000)]:
        x = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        y = (np.arange(n) % 10).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f, protocol=2)
    return d


def test_official_batches_are_read(tmp_path, monkeypatch, caplog):
    """The official format's pixels are the official ones only where every batch has its published md5: these
    batches are made up, so they read as a copy (a repacked or damaged archive was recorded as official)."""
    import hashlib

    from resnet_lab import data

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "cache"))
    d = _official_dir(tmp_path)
    with caplog.at_level("WARNING"):
        c = load_cifar10(d, cache=False)
    assert c.info.kind == "official" and not c.info.official_pixels
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch differ" in caplog.text
    assert c.train_x.shape == (50_000, 3, 32, 32) and c.test_y[:3].tolist() == [0, 1, 2]
    raw = pickle.loads((d / "test_batch").read_bytes())[b"data"][0].reshape(3, 32, 32)
    assert torch.equal(c.test_x[0], torch.from_numpy(raw))
    published = {n: hashlib.md5((d / n).read_bytes()).hexdigest() for n in data.BATCHES}
    monkeypatch.setattr(data, "OFFICIAL_MD5", published)  # as if these were the published bytes
    assert load_cifar10(d, cache=False).info.official_pixels
    monkeypatch.setitem(published, "data_batch_3", "0" * 32)
    assert not load_cifar10(d, cache=False).info.official_pixels


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_decoded_data(tmp_path, monkeypatch, caplog):
    """A read-only data dir: the minutes of decoding are used, and the warning says how to keep them."""
    import errno

    from resnet_lab import runs

    def read_only(obj, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runs, "atomic_save_torch", read_only)
    with caplog.at_level("WARNING"):
        c = load_cifar10(_official_dir(tmp_path))
    assert c.train_x.shape == (50_000, 3, 32, 32)
    assert "cannot write the decoded CIFAR-10 cache" in caplog.text and "RESNET_LAB_DATA_DIR" in caplog.text


def test_classes_must_have_their_official_counts(tmp_path):
    d = _official_dir(tmp_path)
    batch = pickle.loads((d / "data_batch_1").read_bytes())
    batch[b"labels"][0] = 1  # one airplane relabelled: 4999 / 5001, the totals still right
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match=r"\[4999, 5001, 5000.*train images per class.*5000 of each"):
        load_cifar10(d, cache=False)


def test_a_download_is_named_by_its_archive_as_later_sessions_find_it(tmp_path, monkeypatch):
    """torchvision keeps cifar-10-python.tar.gz, which `resolve_source` finds first next time: the same id."""
    import torchvision.datasets

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_LAB_DATA", raising=False)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"archive")
            (Path(root) / "cifar-10-batches-py").mkdir()

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert D._download() == D.resolve_source() == tmp_path / "cifar-10-python.tar.gz"


def test_official_batches_with_wrong_shape(tmp_path):
    with pytest.raises(DataError, match="shape.*3072"):
        load_cifar10(_official_dir(tmp_path, n_train=50, side=16), cache=False)


def test_batch_pickles_cannot_run_code(tmp_path):
    d = _official_dir(tmp_path, n_train=50)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar10(d, cache=False)


# -- on-device augmentation -------------------------------------------------------------------------
def test_augment_matches_pad_crop_flip_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    dx, dy = torch.randint(-4, 5, (2, 16), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = augment(x, dx, dy, flip, fill=(0, 0, 0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        ref = padded[i, :, 4 + dy[i]: 36 + dy[i], 4 + dx[i]: 36 + dx[i]]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_the_loaders_shifts_follow_the_border_augment_pads(monkeypatch):
    """augment(pad=8) padded 8 pixels while the loader still shifted within 4: one constant sets both, and every
    shift a batch is drawn with stays inside the border (a shift past it would read outside the padded image)."""
    from resnet_lab import data

    monkeypatch.setattr(data, "PAD", 2)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = DeviceLoader(x, torch.zeros(64, dtype=torch.long), batch_size=32, seed=0, device="cpu")
    shifts = torch.cat([torch.cat(loader._epoch_plan(e)[1:3]) for e in range(50)])
    assert set(shifts.tolist()) == set(range(-2, 3))
    dx, dy = torch.tensor([-2, 2]), torch.tensor([2, -2])
    out = augment(x[:2], dx, dy, torch.zeros(2, dtype=torch.bool), fill=(0, 0, 0))
    padded = torch.nn.functional.pad(x[:2], (2, 2, 2, 2))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, 2 + dy[i]: 34 + dy[i], 2 + dx[i]: 34 + dx[i]])


def test_loader_varies_crops_and_covers_all_offsets():
    x = torch.arange(64 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(64, 3, 32, 32)
    loader = DeviceLoader(x, torch.zeros(64, dtype=torch.long), batch_size=32, seed=0, device="cpu")
    a, _ = loader.batch(0)
    b, _ = loader.batch(2)  # same images, next epoch, other crops
    assert a.shape == (32, 3, 32, 32) and a.dtype == torch.uint8 and not torch.equal(a, b)
    perm, dx, dy, fl = loader._epoch_plan(0)
    plans = [loader._epoch_plan(e) for e in range(200)]
    dxs = torch.cat([p[1] for p in plans])
    flips = torch.cat([p[3] for p in plans]).float()
    assert set(dxs.tolist()) == set(range(-4, 5))
    assert abs(flips.mean().item() - 0.5) < 0.02
    assert torch.equal(loader.batch(1)[0], DeviceLoader(x, torch.zeros(64, dtype=torch.long), 32, 0, "cpu").batch(1)[0])
    orders = {tuple(p[0].tolist()) for p in plans[:5]}  # each epoch its own shuffle, of every image once
    assert len(orders) == 5 and all(sorted(o) == list(range(64)) for o in orders)


def test_the_45k5k_split_holds_5000_class_balanced_images_out_of_training():
    """The paper chose 64k iterations on a 45k/5k split: the 5k validation images must never be trained on."""
    import types

    from resnet_lab.data import split_data

    y = torch.arange(50_000) % 10
    data = types.SimpleNamespace(train_x=torch.arange(50_000), train_y=y, test_x=torch.arange(10_000) + 10**6,
                                 test_y=torch.arange(10_000) % 10)
    tx, ty, vx, vy = split_data(data, "45k5k")
    assert len(tx) == 45_000 and len(vx) == 5_000 and set(tx.tolist()).isdisjoint(vx.tolist())
    assert torch.equal(ty, y[tx]) and torch.equal(vy, y[vx]) and torch.bincount(vy).tolist() == [500] * 10
    assert split_data(data, "45k5k", train_subset=100)[0].tolist() == tx[:100].tolist()  # subsets of the 45k
    fx, _, ex, _ = split_data(data, "full")
    assert len(fx) == 50_000 and ex.min() >= 10**6  # full: all 50k train, evaluated on the test set


def test_balanced_subset_refuses_a_count_that_is_not_one():
    """order[:-5] would quietly take all but 5 images, and the figure would say '-5 test images'."""
    from resnet_lab.data import balanced_subset

    y = torch.arange(20) % 10
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"n={bad!r}"):
            balanced_subset(torch.zeros(20, 3), y, bad)
    assert len(balanced_subset(torch.zeros(20, 3), y, 50)[1]) == 20  # more than there are: all of them


def test_balanced_subset_mixes_classes():
    y = torch.arange(10).repeat_interleave(100)  # sorted by class, like the copies on disk
    x = torch.arange(1000)
    xs, ys = D.balanced_subset(x, y, 50)
    assert ys.bincount(minlength=10).tolist() == [5] * 10 and torch.equal(y[xs], ys)
    assert torch.equal(D.balanced_subset(x, y, 50)[0], xs)  # fixed order


def test_without_a_source_the_one_decoded_copy_is_used_offline(tmp_path, monkeypatch):
    """After `make reproduce` the CLI works offline without RESNET_LAB_DATA; two copies are not guessed between."""
    import torchvision.datasets

    from resnet_lab.runs import atomic_save_torch

    monkeypatch.setenv("RESNET_LAB_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_LAB_DATA", raising=False)

    class Offline:
        def __init__(self, *a, **k):
            raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)

    def copy(sha):
        info = D.DataInfo(kind="image-folder", path=f"/x/{sha}.tar.gz", sha256=sha * 64, official_pixels=False,
                          n_train=2, n_test=1)
        x = torch.full((2, 3, 32, 32), int(sha, 16), dtype=torch.uint8)
        atomic_save_torch({"train_x": x, "train_y": torch.zeros(2, dtype=torch.int64), "test_x": x[:1],
                           "test_y": torch.zeros(1, dtype=torch.int64), "info": info.to_json()},
                          tmp_path / "cache" / f"cifar10-{sha * 16}-v{D.CACHE_VERSION}.pt")

    with pytest.raises(D.DataError, match="download failed .*Name or service not known"):
        load_cifar10()
    copy("a")
    got = load_cifar10()
    assert got.info.sha256 == "a" * 64 and int(got.train_x[0, 0, 0, 0]) == 10
    copy("b")
    with pytest.raises(D.DataError, match=r"holds 2 decoded copies \(cifar10-a+-v\d+\.pt, cifar10-b+-v\d+\.pt\)"):
        load_cifar10()


def test_evaluation_batches_are_small_on_a_cpu_and_large_on_a_gpu():
    from resnet_lab.data import CPU_EVAL_BATCH, eval_batch_size, eval_batches

    assert eval_batch_size("cuda") == 1000 and eval_batch_size(torch.device("cuda", 0)) == 1000
    assert eval_batch_size("cpu") == CPU_EVAL_BATCH < 1000
    x, y = torch.arange(150).view(150, 1), torch.arange(150)
    chunks = list(eval_batches(x, y))  # x on the CPU: its batch size
    assert [len(c[0]) for c in chunks] == [CPU_EVAL_BATCH] * (150 // CPU_EVAL_BATCH) + [150 % CPU_EVAL_BATCH]
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)  # in order, nothing dropped
    assert [len(c[0]) for c in eval_batches(x, y, 100)] == [100, 50]


def test_the_loader_imports_without_lzma():
    """A Python built without _lzma (some minimal images) must still import the package: only .tar.xz needs it."""
    import subprocess
    import sys

    code = "import sys; sys.modules['lzma'] = None; import resnet_lab.data as d; print(len(d.ARCHIVE_ERRORS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "4"


def test_the_crop_border_is_the_mean_colour_by_default_and_black_when_asked():
    """He et al. pad mean-subtracted images with zeros: the border normalises to about 0, not to -2 std."""
    from resnet_lab.data import augment, pad_colour

    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    shift, flip = torch.tensor([-4, 4]), torch.tensor([False, True])
    mean = normalize(augment(x, shift, shift, flip, fill=pad_colour("mean")))
    assert mean[0, :, :4, :].abs().max() < 0.01 and mean[1, :, -4:, :].abs().max() < 0.01  # the border
    assert torch.allclose(mean[0, :, 4:, 4:], normalize(x)[0, :, :28, :28])  # the image itself, shifted
    assert torch.equal(augment(x, shift, shift, flip), augment(x, shift, shift, flip, fill=pad_colour("mean")))
    black = augment(x, shift, shift, flip, fill=pad_colour("black"))
    assert black[0, :, :4, :].eq(0).all() and black[0, :, 4:, 4:].eq(200).all()
    with pytest.raises(ValueError, match=r"pad_fill='grey'.*'mean', 'black'"):
        pad_colour("grey")


def test_a_run_takes_its_configs_pad_fill_and_old_configs_read_as_black():
    from resnet_lab.config import RunConfig

    assert RunConfig().pad_fill == "mean" and RunConfig().name == "resnet-20"
    old = {k: v for k, v in RunConfig(pad_fill="black").to_json().items() if k != "pad_fill"}
    assert RunConfig.from_json(old).pad_fill == "black"  # a config.json from before the field
    assert RunConfig.from_json({**old, "pad_fill": float("nan")}).pad_fill == "black"  # a DataFrame's gap
    assert RunConfig(pad_fill="black").name == "resnet-20 black-pad"
    with pytest.raises(ValueError, match="pad_fill='zero'"):
        RunConfig(pad_fill="zero")
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    ld = DeviceLoader(x, torch.zeros(64, dtype=torch.long), 64, 0, "cpu", pad_fill="black")
    assert ld.batch(0)[0].eq(0).any()  # some crop shifted: its border is black
    assert not DeviceLoader(x, torch.zeros(64, dtype=torch.long), 64, 0, "cpu").batch(0)[0].eq(0).any()


def test_load_runs_reads_a_run_stored_before_pad_fill_as_black(tmp_path):
    """Its row must name the config it trained (folder = hash), and never pool with a mean-padded run."""
    import json

    from resnet_lab.analysis import summarize
    from resnet_lab.config import RunConfig, make_config
    from resnet_lab.runs import load_runs

    old, new = make_config("smoke", pad_fill="black"), make_config("smoke", seed=1)
    for cfg, drop in ((old, True), (new, False)):
        d = tmp_path / cfg.hash
        d.mkdir()
        js = {k: v for k, v in cfg.to_json().items() if not (drop and k == "pad_fill")}
        (d / "config.json").write_text(json.dumps(js))
        (d / "summary.json").write_text(json.dumps({"status": "done", "final_train_err": 0.5, "final_test_err": 0.5,
                                                    "params": 1, "flops": 1}))
    runs = load_runs(tmp_path).set_index("hash")
    assert runs.loc[old.hash, "pad_fill"] == "black" and runs.loc[new.hash, "pad_fill"] == "mean"
    assert all(RunConfig.from_json(r).hash == h for h, r in zip(runs.index, runs.to_dict("records")))
    assert runs.loc[old.hash, "name"].endswith("black-pad")
    assert len(load_runs(tmp_path, pad_fill="black")) == 1
    t = summarize(runs.reset_index(), ["arch", "depth", "pad_fill"])
    assert sorted(t["runs"]) == [1, 1]
    with pytest.raises(ValueError, match="pad_fill"):  # never two seeds of one config
        summarize(runs.reset_index(), ["arch", "depth"])


def test_a_device_loader_refuses_a_batch_size_below_one():
    """s25 audit E2: -5 passed (50000 // -5 is not 0) and built index tensors until the memory ran out."""
    from resnet_lab.data import DeviceLoader

    x, y = torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)
    for bad in (-5, 0, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} is not valid: use a positive integer"):
            DeviceLoader(x, y, bad, 0, "cpu")
    assert DeviceLoader(x, y, 16, 0, "cpu").steps_per_epoch == 4
