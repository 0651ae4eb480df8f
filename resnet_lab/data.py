"""CIFAR-10 from the official python archive or an image-folder tree/tarball, decoded once, cached
as uint8 tensors, and fed from the training device with crop + flip done there in batches."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import is_int

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
N_TRAIN, N_TEST = 50_000, 10_000
# Bumped when decoding changes (labels, checks), so a cache made by the old decoder is not reused. 3: the official
# format's pixels are official only where every batch has its published md5.
CACHE_VERSION = 3
# Official CIFAR-10 per-channel statistics; the JPEG copy differs by < 0.002 (see shared/data/README.md).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXT = (".png", ".jpg", ".jpeg")
OFFICIAL_NAMES = ("cifar-10-python.tar.gz", "cifar-10-batches-py")
BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
# The md5 of each batch of the official python archive, as its publisher (and torchvision) list them: a copy in
# the official format with other bytes (re-encoded, repacked, damaged) is not the official pixels.
OFFICIAL_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
# what reading a damaged archive raises (zlib's and lzma's errors are not OSErrors; bz2's is)
try:  # a Python built without _lzma still reads every other archive (.tar.xz then fails in tarfile, by name)
    import lzma
    _LZMA_ERRORS: tuple[type[Exception], ...] = (lzma.LZMAError,)
except ImportError:
    _LZMA_ERRORS = ()
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, *_LZMA_ERRORS)
PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"


class DataError(ValueError):
    """The given source is missing, not CIFAR-10, or damaged."""


@dataclass(frozen=True)
class DataInfo:
    kind: str  # "official" (python pickle batches) or "image-folder"
    path: str
    sha256: str
    official_pixels: bool  # False for re-encoded (lossy) copies such as the JPEG tarball
    n_train: int
    n_test: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Cifar10:
    """Train/test images as uint8 (N, 3, 32, 32) with int64 labels, plus where they came from."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: DataInfo


# -- locating the source ----------------------------------------------------------------------
def data_dir() -> Path:
    """Cache and download folder: $RESNET_LAB_DATA_DIR, else the project's data/."""
    return Path(os.environ.get("RESNET_LAB_DATA_DIR", PROJECT_DATA))


def resolve_source(source: str | os.PathLike | None = None) -> Path | None:
    """Argument, else $RESNET_LAB_DATA, else a copy found in data/; None means 'download'."""
    if source is None:
        source = os.environ.get("RESNET_LAB_DATA") or None
    if source is not None:
        p = Path(os.path.abspath(Path(source).expanduser()))  # recorded in the cache: read back from elsewhere too
        if not p.exists():
            raise DataError(
                f"CIFAR-10 source {str(p)!r} does not exist: give the official cifar-10-python.tar.gz, "
                f"its extracted cifar-10-batches-py/, or an image-folder tree/tarball laid out {{train,test}}/<class>/*.jpg"
            )
        if p.is_dir() and not (p / "train").exists():  # the folder torchvision is given (`root`), which holds the
            for name in OFFICIAL_NAMES:  # archive and the extracted folder: the one data/ would give, tarball first
                if (p / name).exists():
                    return p / name
        return p
    d = data_dir()
    for name in (*OFFICIAL_NAMES, "cifar10-jpeg.tar.gz", "cifar10-jpeg"):
        if (d / name).exists():
            return Path(os.path.abspath(d / name))
    return None


def _sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, in sorted order)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# -- decoding ---------------------------------------------------------------------------------
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only numpy's array rebuilders, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file (not an array)")


def _read_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch's (images, labels); `name` says where it is (the archive or folder, and the batch)."""
    try:
        d = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        x = np.asarray(d[b"data"])
        if x.dtype != np.uint8:  # floats in [0, 1] would become black images without a word
            raise DataError(f"CIFAR-10 batch {name!r} holds {x.dtype} data; the official batches hold uint8 "
                            "pixels (0-255)")
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # truncated pickle, missing keys
        raise DataError(f"CIFAR-10 batch {name!r} is damaged or not a CIFAR-10 batch: {e}") from e
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DataError(f"CIFAR-10 batch {name!r} has data of shape {x.shape}; expected (N, 3072) with N labels")
    return x.reshape(-1, 3, 32, 32), y


def _load_official(path: Path) -> tuple[tuple[np.ndarray, ...], bool]:
    """The arrays, and whether every batch has its published md5 (the official pixels)."""
    names = list(BATCHES)
    raws: dict[str, bytes] = {}
    if path.is_dir():
        for n in names:
            f = path / n
            if not f.exists():
                raise DataError(f"{str(path)!r} is missing {n!r}: not an extracted cifar-10-batches-py folder")
            raws[n] = f.read_bytes()
    else:
        with _open_tar(path) as tar:
            try:
                for m in tar:
                    base = m.name.rsplit("/", 1)[-1]
                    if base in names and m.isfile():
                        raws[base] = tar.extractfile(m).read()
                _read_to_the_end(tar)
            except ARCHIVE_ERRORS as e:
                raise DataError(f"archive {str(path)!r} is truncated or corrupt: {e}") from e
        missing = [n for n in names if n not in raws]
        if missing:
            raise DataError(f"archive {str(path)!r} lacks {missing}: not the official CIFAR-10 python archive")
    parts = [_read_batch(raws[n], f"{path}/{n}") for n in names]
    tx = np.concatenate([p[0] for p in parts[:5]])
    ty = np.concatenate([p[1] for p in parts[:5]])
    other = [n for n in names if hashlib.md5(raws[n]).hexdigest() != OFFICIAL_MD5[n]]
    if other:
        log.warning("%s: %s differ(s) from the published CIFAR-10 batches (md5): read as a re-encoded copy "
                    "(runs record official_pixels false), not the official pixels", path, ", ".join(other))
    return (tx, ty, parts[5][0], parts[5][1]), not other


def _read_to_the_end(tar: tarfile.TarFile) -> None:
    """Read a tarball past its members to the end of the file, so that gzip checks its CRC and length: tarfile
    stops at the archive's end marker, and a flipped byte in a member would otherwise load as other pixels."""
    f = tar.fileobj
    while f is not None and f.read(1 << 20):
        pass


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except ARCHIVE_ERRORS as e:
        lines = [line.strip("- ").rstrip(":") for line in str(e).splitlines() if line.strip()]  # one line a method
        why = lines[0] + (": " + "; ".join(lines[1:]) if lines[1:] else "")
        raise DataError(f"{str(path)!r} is not a readable tar archive (truncated or corrupt?): {why}; accepted: "
                        "cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder tree or tarball") from e


def _decode(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            a = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise DataError(f"image {name!r} cannot be decoded (corrupt file?): {e}") from e
    if a.shape != (32, 32, 3):
        raise DataError(f"image {name!r} is {a.shape[1]}x{a.shape[0]}; CIFAR-10 images are 32x32")
    return a


def _is_image(parts: tuple[str, ...]) -> bool:
    """An image file's path, not the AppleDouble twin macOS puts beside it in archives (`._0001.jpg`, under
    `__MACOSX/`): those are metadata with an image's name, and would fail to decode."""
    return parts[-1].lower().endswith(IMAGE_EXT) and not parts[-1].startswith("._") and "__MACOSX" not in parts


def _iter_image_folder(path: Path):
    """Yield (split, class, name, bytes) for every image under {train,test}/<class>/."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if _is_image(p.relative_to(path).parts) and p.is_file():
                yield p.relative_to(path).parts, p.read_bytes()
        return
    with _open_tar(path) as tar:
        try:
            for m in tar:
                if m.isfile() and _is_image(tuple(m.name.split("/"))):
                    yield tuple(m.name.split("/")), tar.extractfile(m).read()
            _read_to_the_end(tar)
        except (*ARCHIVE_ERRORS, ValueError) as e:
            raise DataError(f"archive {str(path)!r} is truncated or corrupt: {e}") from e


def _load_image_folder(path: Path) -> tuple[np.ndarray, ...]:
    items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for parts, raw in _iter_image_folder(path):
        split = parts[-3] if len(parts) >= 3 else None
        if split not in items:
            continue
        items[split].append((parts[-2], parts[-1], raw))
    out = []
    for split, expected in (("train", N_TRAIN), ("test", N_TEST)):
        classes = sorted({c for c, _, _ in items[split]})
        if not items[split]:
            raise DataError(f"{str(path)!r} has no {split}/<class>/*.png|jpg images: not a CIFAR-10 image folder")
        if len(classes) != len(CLASSES):
            raise DataError(f"{str(path)!r} has {len(classes)} classes in {split}/ ({classes[:12]}); CIFAR-10 has 10")
        unknown = [c for c in classes if c.lower() not in CLASSES]
        if unknown:  # a folder's name is its label: 'car' for 'automobile' would shift every label after it
            raise DataError(f"{str(path)!r} has class folders {unknown} in {split}/; CIFAR-10's are "
                            f"{', '.join(CLASSES)} (the names give the labels, in this order)")
        _decode(items[split][0][2], f"{split}/{items[split][0][0]}/{items[split][0][1]}")  # shape check first
        if len(items[split]) != expected:
            raise DataError(f"{str(path)!r} has {len(items[split])} {split} images; CIFAR-10 has {expected}")
        index = {c: CLASSES.index(c.lower()) for c in classes}  # the official label order, by name
        items[split].sort(key=lambda t: (index[t[0]], t[1]))
        x = np.stack([_decode(raw, f"{split}/{c}/{n}") for c, n, raw in items[split]]).transpose(0, 3, 1, 2)
        y = np.array([index[c] for c, _, _ in items[split]], dtype=np.int64)
        out += [np.ascontiguousarray(x), y]
    return tuple(out)


def _validate(tx: np.ndarray, ty: np.ndarray, vx: np.ndarray, vy: np.ndarray, path: Path) -> None:
    if len(tx) != N_TRAIN or len(vx) != N_TEST:
        raise DataError(f"{str(path)!r} has {len(tx)}/{len(vx)} train/test images; CIFAR-10 has {N_TRAIN}/{N_TEST}")
    for split, y, per in (("train", ty, N_TRAIN // 10), ("test", vy, N_TEST // 10)):
        if set(np.unique(y).tolist()) != set(range(10)):
            raise DataError(f"{str(path)!r} has labels {sorted(set(np.unique(y).tolist()))}; CIFAR-10 has 0..9")
        counts = np.bincount(y, minlength=10).tolist()
        if counts != [per] * 10:
            raise DataError(f"{str(path)!r} has {counts} {split} images per class ({', '.join(CLASSES)}); "
                            f"CIFAR-10 has {per} of each")


# -- public API -------------------------------------------------------------------------------
def load_cifar10(source: str | os.PathLike | None = None, cache: bool = True) -> Cifar10:
    """CIFAR-10 as uint8 tensors; decoded once per source, then read from a sha256-keyed cache.

    With no source anywhere (argument, $RESNET_LAB_DATA, data/), the one decoded copy in data/cache/
    is used before a download is tried: after `make reproduce` (which found ../shared's copy) the CLI
    works offline without the variable. The copy records its source's sha256, as every run does."""
    path = resolve_source(source)
    if path is None:
        every = _cache_file("*")
        copies = sorted(every.parent.glob(every.name)) if cache else []
        data = _read_cache(copies[0]) if len(copies) == 1 else None
        if data is not None:
            log.info("no CIFAR-10 source given: using the decoded copy of %s (sha256 %s) in %s",
                     data.info.path, data.info.sha256[:16], copies[0])
            return data
        path = (_source_of_older_copy(every.parent) if cache and not copies else None) or _download(copies)
    sha = _sha256(path)
    official_folder = path.is_dir() and any((path / n).exists() for n in (*BATCHES, "batches.meta"))
    kind = "official" if official_folder or path.name.startswith("cifar-10-python") else None
    cache_file = _cache_file(sha[:16])
    if cache and cache_file.exists():
        data = _read_cache(cache_file)
        if data is not None:  # the path this load was given, not the one the first decode was
            _remove_older_copies(cache_file.parent, sha[:16])  # an older decoder's copy beside it (a checkout
            return replace(data, info=replace(data.info, path=str(path)))  # not yet updated wrote it): dead weight
    if kind is None:
        kind = _sniff(path)
    if kind == "official":
        arrays, official = _load_official(path)
    else:
        arrays, official = _load_image_folder(path), False
    _validate(*arrays, path)
    tx, ty, vx, vy = (torch.from_numpy(a) for a in arrays)
    info = DataInfo(kind=kind, path=str(path), sha256=sha, official_pixels=official,
                    n_train=len(tx), n_test=len(vx))
    if cache:
        from .runs import atomic_save_torch

        try:
            atomic_save_torch({"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy, "info": info.to_json()},
                              cache_file)
        except OSError as e:  # the decoded data are good: use them, and say why the next load decodes again
            log.warning("cannot write the decoded CIFAR-10 cache %s (%s): using it uncached; set "
                        "RESNET_LAB_DATA_DIR to a writable folder to keep it", cache_file, e.strerror or e)
        else:
            _remove_older_copies(cache_file.parent, sha[:16])
    return Cifar10(tx, ty, vx, vy, info)


def _older_copies(folder: Path, key: str = "*") -> list[Path]:
    """Decoded copies an older decoder (a lower CACHE_VERSION) wrote, of the source `key` or of any."""
    found = []
    for p in folder.glob(f"cifar10-{key}-v*.pt"):
        version = p.stem.rsplit("-v", 1)[-1]
        if version.isdigit() and int(version) < CACHE_VERSION:
            found.append(p)
    return sorted(found)


def _remove_older_copies(folder: Path, key: str) -> None:
    """Once this decoder's copy of a source is written, the older ones of it are dead weight (185 MB each); a
    newer decoder's (another checkout sharing the folder) is its own, and stays."""
    for old in _older_copies(folder, key):
        try:
            old.unlink(missing_ok=True)
        except OSError as e:  # another user's file in a shared folder, say: harmless, and not this load's concern
            log.debug("older decoded copy %s left: %s", old, e)


def _source_of_older_copy(folder: Path) -> Path | None:
    """With no source given and no copy of this decoder's: the source the one older decoder's copy was made from,
    where it still exists (decoded again, so that a version bump keeps `make reproduce`'s offline promise)."""
    older = _older_copies(folder)
    if len(older) != 1:
        return None
    data = _read_cache(older[0])
    src = Path(data.info.path) if data is not None else None
    if src is None or not src.exists():
        return None
    log.info("no CIFAR-10 source given: decoding %s again, the source of the older copy %s", src, older[0])
    return src


def _cache_file(key: str) -> Path:
    """data/cache/cifar10-<key>-v<CACHE_VERSION>.pt: key is the source's sha256[:16] ("*": a glob of all)."""
    return data_dir() / "cache" / f"cifar10-{key}-v{CACHE_VERSION}.pt"


def _read_cache(cache_file: Path) -> Cifar10 | None:
    """A decoded copy, or None (logged) where it is unreadable: a damaged cache is rebuilt, never trusted."""
    try:
        d = torch.load(cache_file, weights_only=True)
        return Cifar10(d["train_x"], d["train_y"], d["test_x"], d["test_y"], DataInfo(**d["info"]))
    except Exception as e:
        log.warning("ignoring unreadable cache %s (%s)", cache_file, e)
        return None


def _sniff(path: Path) -> str:
    """'official' if the tarball holds data_batch_* files, else 'image-folder'."""
    if path.is_dir():
        return "image-folder"
    with _open_tar(path) as tar:
        try:
            for m in tar:
                if m.name.rsplit("/", 1)[-1].startswith("data_batch_"):
                    return "official"
                if m.name.lower().endswith(IMAGE_EXT):
                    return "image-folder"
        except ARCHIVE_ERRORS as e:
            raise DataError(f"archive {str(path)!r} is truncated or corrupt: {e}") from e
    raise DataError(f"archive {str(path)!r} holds neither CIFAR-10 batches nor images")


def _download(cached: Sequence[Path] = ()) -> Path:
    """Fetch the official archive with torchvision (needs internet); `cached`: decoded copies to name if it fails."""
    from torchvision.datasets import CIFAR10

    d = data_dir()
    try:
        CIFAR10(str(d), train=True, download=True)
    except Exception as e:
        held = (f"; {d / 'cache'} holds {len(cached)} decoded copies ({', '.join(p.name for p in cached)}), "
                "too many to pick one" if len(cached) > 1 else "")
        raise DataError(
            f"no CIFAR-10 copy found (argument, $RESNET_LAB_DATA, or {d}) and the download failed ({e}){held}; "
            "set RESNET_LAB_DATA to cifar-10-python.tar.gz or an image-folder tarball"
        ) from e
    # torchvision keeps the archive beside the folder it unpacks, and `resolve_source` finds the archive
    # first: name it now too, so the dataset id (its sha256) is the same in this session and the next
    tarball = d / "cifar-10-python.tar.gz"
    return tarball if tarball.exists() else d / "cifar-10-batches-py"


def class_balanced_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed permutation that interleaves classes, so any prefix is (nearly) class-balanced."""
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    per_class = [ix[torch.randperm(len(ix), generator=g)] for ix in per_class]
    rank = torch.empty(len(labels), dtype=torch.float64)
    for ix in per_class:  # k-th image of each class gets rank k (+ jitter to mix classes)
        rank[ix] = torch.arange(len(ix), dtype=torch.float64) + torch.rand(len(ix), generator=g, dtype=torch.float64) * 0.5
    return torch.argsort(rank, stable=True)


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """n images in a fixed class-balanced order: the copies on disk are sorted by class, so a plain
    prefix would be one class."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):  # [:-5] would drop 5
        raise ValueError(f"n={n!r} is not valid: use None (all {len(y):,} images) or a positive integer (more "
                         "than there are takes them all)")
    order = class_balanced_order(y, seed=seed)
    order = order if n is None else order[:n]
    return x[order], y[order]


def split_data(data: Cifar10, split: str = "full", train_subset: int | None = None,
               eval_subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, eval_x, eval_y): the 50k/10k split, or 45k/5k with the 5k held out of train."""
    order = class_balanced_order(data.train_y, seed=0)
    if split == "full":
        tr, ex, ey = order, data.test_x, data.test_y
    elif split == "45k5k":
        tr, val = order[5_000:], order[:5_000]
        ex, ey = data.train_x[val], data.train_y[val]
    else:
        raise ValueError(f"split={split!r} is not valid: use 'full' or '45k5k'")
    if train_subset is not None:
        tr = tr[:train_subset]
    tx, ty = data.train_x[tr], data.train_y[tr]
    if eval_subset is not None:
        ex, ey = balanced_subset(ex, ey, eval_subset)
    return tx, ty, ex, ey


# -- on-device batches ------------------------------------------------------------------------
_NORM: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float, per-channel standardised.

    The mean/std tensors are made once per device: building them from Python lists every step
    would be a host-to-device copy per step, and is not allowed inside a CUDA graph capture.
    """
    key = (x.device, dtype)
    if key not in _NORM:
        _NORM[key] = (torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255,
                      torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255)
        if x.device.type == "cuda":  # packed runs on other streams read them: finish making them first
            torch.cuda.current_stream(x.device).synchronize()
    mean, std = _NORM[key]
    return (x.to(dtype) - mean) / std


def pad_colour(pad_fill: str) -> tuple[int, ...]:
    """The uint8 colour of the crop's border: the training-set mean (0 after normalising, as the paper's zero
    padding of mean-subtracted images) or black (torchvision's RandomCrop before Normalize: about -2 std)."""
    fills = {"mean": tuple(round(255 * m) for m in MEAN), "black": (0, 0, 0)}
    if pad_fill not in fills:
        raise ValueError(f"pad_fill={pad_fill!r} is not valid: use one of {', '.join(map(repr, fills))}")
    return fills[pad_fill]


PAD = 4  # the random crop's border in pixels (He et al. 2015): `augment` pads it, DeviceLoader shifts within it


def augment(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor,
            fill: Sequence[int] | None = None) -> torch.Tensor:
    """Pad-PAD random crop (shift dx, dy in [-PAD, PAD]) and horizontal flip, all in one gather.

    x: (B, C, H, W) any dtype; dx, dy: (B,) int64; flip: (B,) bool; fill: the border's value per channel
    (`pad_colour`; None: the mean colour, RunConfig's default). The paper's border is the mean colour (He et
    al. pad images with the per-pixel mean subtracted; fb.resnet.torch normalises, then crops); torchvision's
    recipe pads black, as the bench's baseline does.
    """
    B, C, H, W = x.shape
    xp = x.new_empty(B, C, H + 2 * PAD, W + 2 * PAD)  # (B, C, H+2p, W+2p)
    for c, v in enumerate(pad_colour("mean") if fill is None else fill):
        xp[:, c].fill_(v)  # a Python scalar: no copy from the host
    xp[:, :, PAD:PAD + H, PAD:PAD + W] = x
    rows = (dy + PAD).view(B, 1) + torch.arange(H, device=x.device).view(1, H)  # (B, H)
    ar = torch.arange(W, device=x.device).view(1, W)
    cols = torch.where(flip.view(B, 1), W - 1 - ar, ar) + (dx + PAD).view(B, 1)  # (B, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = xp.permute(0, 2, 3, 1)[b, rows.view(B, H, 1), cols.view(B, 1, W)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class DeviceLoader:
    """Training batches drawn from uint8 images kept on the device.

    The shuffle and augmentation of epoch e come from a generator seeded by (seed, e), so batch
    i of a run is a pure function of (seed, i): resuming at any step replays exactly.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: torch.device | str,
                 pad_fill: str = "mean"):
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not valid: use a positive integer")
        self.device = torch.device(device)
        self.fill = pad_colour(pad_fill)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(x) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(x)} training images")
        self._epoch, self._plan = -1, None

    def _epoch_plan(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.steps_per_epoch * self.batch_size
        perm = torch.randperm(len(self.x), generator=g)[:n]
        shifts = torch.randint(-PAD, PAD + 1, (2, n), generator=g)  # the border `augment` pads
        flips = torch.rand(n, generator=g) < 0.5
        dev = self.device
        return perm.to(dev), shifts[0].to(dev), shifts[1].to(dev), flips.to(dev)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (B,3,32,32) augmented, labels) for global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._epoch_plan(epoch)
        perm, dx, dy, fl = self._plan
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        ix = perm[s]
        return augment(self.x[ix], dx[s], dy[s], fl[s], fill=self.fill), self.y[ix]


# Images per evaluation batch. A GPU wants large batches (fewer launches); a CPU wants batches whose
# activations stay in its caches: measured on a 2-core EPYC, channels_last, a ResNet-56 evaluates
# 1280 img/s at 64, 823 at 500 and 540-620 at 1000 (ResNet-110: 696 at 64, 422 at 500).
GPU_EVAL_BATCH = 1000
CPU_EVAL_BATCH = 64


def eval_batch_size(device: str | torch.device) -> int:
    """The evaluation batch size for `device`: GPU_EVAL_BATCH on CUDA, else CPU_EVAL_BATCH."""
    return GPU_EVAL_BATCH if torch.device(device).type == "cuda" else CPU_EVAL_BATCH


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented (images, labels) chunks, in order; batch_size None: `eval_batch_size(x.device)`."""
    batch_size = eval_batch_size(x.device) if batch_size is None else batch_size
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
