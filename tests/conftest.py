"""Test-wide setup: results and dataset caches go to a temporary folder, never into the project."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="resnet-lab-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ["RESNET_LAB_RESULTS"] = str(_TMP / "results")
os.environ.setdefault("RESNET_LAB_DATA_DIR", str(_TMP / "data"))
os.environ["CI"] = os.environ.get("CI", "1")  # no progress bars in test logs
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
if not os.environ.get("RESNET_LAB_DATA") and SHARED.exists():
    os.environ["RESNET_LAB_DATA"] = str(SHARED)


def real_source() -> Path | None:
    p = os.environ.get("RESNET_LAB_DATA")
    return Path(p) if p and Path(p).exists() else None


# CI (.ci/run) sets RESNET_LAB_REQUIRE_DATA=1: there a missing copy must fail the run, not skip the ~90 tests
# that train (a green CI that trained nothing); a machine without the data may still run the rest.
if os.environ.get("RESNET_LAB_REQUIRE_DATA") == "1" and real_source() is None:
    where = os.environ.get("RESNET_LAB_DATA") or SHARED
    raise pytest.UsageError(f"RESNET_LAB_REQUIRE_DATA=1 but there is no CIFAR-10 copy at {where} (set RESNET_LAB_DATA)")

def smoke_04_grid(path: Path, depths: str = "8") -> Path:
    """A sweep grid of 04 small enough for the CPU: smoke nets, one draw, 40 test images, one gradient sample."""
    path.write_text("notebook: 04_unraveled_ensemble\npreset: smoke\n"
                    f"parameters:\n  depth: [{depths}]\n  draws: [1]\n  eval_images: [40]\n  grad_samples: [1]\n")
    return path


needs_data = pytest.mark.skipif(real_source() is None,
                                reason="no CIFAR-10 copy: set RESNET_LAB_DATA (CI uses ../shared/data/cifar10-jpeg.tar.gz)")


@pytest.fixture(scope="session")
def cifar():
    """The real CIFAR-10 copy, decoded once for the whole session (cached under the temp data dir)."""
    if real_source() is None:
        pytest.skip("no CIFAR-10 copy: set RESNET_LAB_DATA")
    from resnet_lab.data import load_cifar10

    return load_cifar10()


@pytest.fixture
def results(tmp_path):
    """A fresh, empty run store for one test."""
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _close_figures():
    """Each test's figures closed after it: pyplot keeps every figure it made (and warns past 20)."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:  # only where a test drew something
        sys.modules["matplotlib.pyplot"].close("all")
