"""Whether tests/test_gpu.py already ran on this GPU kind with these sources and this torch.

A GPU session has 15 minutes of device time, and the GPU tests take up to 4 of them (TESTS_S): run in every
session, they would cost about a third of the training the paper grids need, while a session that changed no
code learns nothing new from them, a failure included (it stays until the code changes). So
`.ci/gpu-session` records their outcomes (`record`) as results/bench/<device>-tests.json, which comes back
with the call's files and is committed; a later call runs the tests again only when `check` finds the
record's digest of the package and the GPU tests, its device name, torch or CUDA different from the call's
own. A run that says nothing final is not recorded: a test skipped (on a GPU only a missing CIFAR-10 copy
skips one) or cut off by pytest-timeout (a cold compile, say), or no test at all.

    python -m resnet_lab.gputests check results/bench --device cuda        # exit 0/4: ran here already
    python -m resnet_lab.gputests record "$OUT" a.xml b.xml --device cuda  # pytest --junitxml files
    python -m resnet_lab.gputests status results/bench                     # here: would a call skip them?
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from .runs import atomic_write_json
from .train import device_name, device_slug, resolve_device

ROOT = Path(__file__).resolve().parent.parent
# what the GPU tests exercise: a change to any of these is what they are there to catch
SOURCES = ("resnet_lab/**/*.py", "tests/test_gpu.py", "tests/conftest.py", "tests/__init__.py")
KEYS = ("digest", "device", "torch", "cuda")  # a record stands for this call's tests only where all four match
TIMEOUT = "Timeout"  # pytest-timeout's failure message: "Failed: Timeout (>120.0s) from pytest-timeout."
PASSED, FAILED, RUN = 0, 4, 3  # check's exit codes: ran here and passed, ran here with failures, to run


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of SOURCES: the same on any machine for the same files. Dot folders
    and __pycache__ are left out: git ignores them, so the device's copy of the tree has none."""
    files = sorted({p for pattern in SOURCES for p in root.glob(pattern) if p.is_file()
                    and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)})
    if not files:
        raise FileNotFoundError(f"none of {SOURCES} under {root}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def environment(device: str, root: Path = ROOT) -> dict[str, Any]:
    """The four KEYS for this machine: the sources' digest, the device's name, torch and CUDA versions."""
    return {"digest": source_digest(root), "device": device_name(resolve_device(device)),
            "torch": str(torch.__version__), "cuda": torch.version.cuda}


def record_file(folder: Path, device: str) -> Path:
    """<folder>/<device slug>-tests.json, named like the bench's files (nvidia-h200-tests.json)."""
    return Path(folder) / f"{device_slug(device)}-tests.json"


def summarise(xml_files: list[Path]) -> dict[str, Any]:
    """Each test's outcome from pytest's --junitxml files (passed, skipped or failed; an error counts as
    failed), the counts, and the tests pytest-timeout cut off (`cut_off`, failed too)."""
    tests: dict[str, str] = {}
    cut_off: set[str] = set()
    for f in xml_files:
        for case in ET.parse(f).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            tests[name] = "failed" if tests.get(name) == "failed" else outcome  # a setup error and a pass: failed
            if any(TIMEOUT in (c.get("message") or "") for c in case if c.tag in ("failure", "error")):
                cut_off.add(name)
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "skipped", "failed")}
    return {**counts, "tests": dict(sorted(tests.items())), "cut_off": sorted(cut_off)}


def not_final(summary: dict[str, Any]) -> str | None:
    """Why these outcomes would not hold for a later call on the same sources (None: they would)."""
    if not summary["tests"]:
        return "no test ran"
    if summary["skipped"]:
        return (f"{summary['skipped']} skipped (on a GPU only a missing CIFAR-10 copy skips a test; "
                "all skip without CUDA)")
    if summary["cut_off"]:
        return f"cut off by pytest-timeout: {', '.join(n.split('::')[-1] for n in summary['cut_off'])}"
    return None


def record(out: Path, xml_files: list[Path], device: str, root: Path = ROOT) -> Path | None:
    """Write the tests' outcomes into `out`; None (nothing written) where `not_final` says they would not hold
    for a later call."""
    summary = summarise(xml_files)
    if not_final(summary):
        return None
    env = environment(device, root)
    path = record_file(out, env["device"])
    atomic_write_json(path, {**env, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **summary})
    return path


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A record, or None and why not."""
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no record ({path})"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e})"
    return (rec, "") if isinstance(rec, dict) else (None, f"{path} is not a record (a JSON object)")


def _outcomes(rec: dict[str, Any]) -> str:
    tests = rec.get("tests")
    failed = [n.split("::")[-1] for n, o in tests.items() if o == "failed"] if isinstance(tests, dict) else []
    return (f"{rec.get('passed')} passed, {rec.get('skipped')} skipped, {rec.get('failed')} failed"
            f"{' (' + ', '.join(failed) + ')' if failed else ''} on {rec.get('device')} at {rec.get('date')}")


def check(folder: Path, device: str, root: Path = ROOT) -> tuple[int, str]:
    """(PASSED or FAILED, what the record holds) where `folder` holds the tests' outcomes for this device,
    sources, torch and CUDA; else (RUN, why they are to run)."""
    env = environment(device, root)
    path = record_file(folder, env["device"])
    rec, why = _read(path)
    if rec is None:
        return RUN, why
    changed = [k for k in KEYS if rec.get(k) != env[k]]
    if changed:
        what = ", ".join("the sources" if k == "digest" else f"{k} {rec.get(k)!r} -> {env[k]!r}" for k in changed)
        return RUN, f"{path}: {what} changed since they ran"
    return (FAILED if rec.get("failed") else PASSED), (
        f"{_outcomes(rec)} with these sources, torch {env['torch']} and CUDA {env['cuda']} ({path})")


def status(folder: Path, root: Path = ROOT) -> list[str]:
    """For each record in `folder`, whether these sources are the ones it ran on: what a call with that device
    and its torch would do, told here, where there is no such device."""
    digest = source_digest(root)
    lines = []
    for path in sorted(Path(folder).glob("*-tests.json")):
        rec, why = _read(path)
        if rec is None:
            lines.append(why)
            continue
        same = rec.get("digest") == digest
        lines.append(f"{path.name}: {_outcomes(rec)} (torch {rec.get('torch')}, CUDA {rec.get('cuda')}); "
                     + ("these sources: a call there with that torch skips them" if same else
                        "the sources changed since: a call there runs them"))
    return lines or [f"no record in {folder}: a GPU call runs the tests"]


def main(argv: list[str] | None = None) -> int:
    """check: exit 0 (passed) or 4 (failed) when the tests ran here already, 3 when they are to run;
    record: write it, exit 0; status: print, exit 0."""
    p = argparse.ArgumentParser(prog="python -m resnet_lab.gputests", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="exit 0/4 if FOLDER holds the tests' outcomes for this device, sources, torch")
    c.add_argument("folder", type=Path)
    r = sub.add_parser("record", help="write OUT/<device>-tests.json where the junit files say something final")
    r.add_argument("out", type=Path)
    r.add_argument("xml", type=Path, nargs="+")
    for sp in (c, r):
        sp.add_argument("--device", default="cuda", help="auto, cpu or cuda[:N] (default cuda)")
    st = sub.add_parser("status", help="whether FOLDER's records ran on these sources (no GPU needed)")
    st.add_argument("folder", type=Path, nargs="?", default=ROOT / "results" / "bench")
    a = p.parse_args(argv)
    if a.cmd == "status":
        print("\n".join(status(a.folder)))
        return 0
    if a.cmd == "check":
        code, why = check(a.folder, a.device)
        print(f"GPU tests {'to run' if code == RUN else 'ran here already'}: {why}")
        return code
    try:
        s = summarise(a.xml)
    except (OSError, ET.ParseError) as e:
        p.error(f"a junit file is missing or unreadable: {e}")
    path = record(a.out, a.xml, a.device)
    print(f"GPU tests: {s['passed']} passed, {s['skipped']} skipped, {s['failed']} failed: "
          + (f"recorded in {path}" if path else f"not recorded ({not_final(s)}): the next call runs them"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
