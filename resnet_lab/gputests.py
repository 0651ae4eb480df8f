"""Whether tests/test_gpu.py already ran on this GPU kind with these sources and this torch.

A GPU session has 15 minutes of device time, and the GPU tests take up to 4 of them (TESTS_S): run in every
session, they would cost about a third of the training the paper grids need, while a session that changed no
code learns nothing new from them, a failure included (it stays until the code changes). So
`.ci/gpu-session` records their outcomes (`record`: each test's, where both processes ran to their end and
at least one test did not skip) as results/bench/<device>-tests.json, which comes back with the call's files
and is committed; a later call runs the tests again only when `check` finds the record's digest of the
package and the GPU tests, its device name, torch or CUDA different from the call's own. Its log line says
what the record holds, failures by name.

    python -m resnet_lab.gputests check results/bench --device cuda        # exit 0: ran here already
    python -m resnet_lab.gputests record "$OUT" a.xml b.xml --device cuda  # pytest --junitxml files
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


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of SOURCES: the same on any machine for the same files."""
    files = sorted({p for pattern in SOURCES for p in root.glob(pattern) if p.is_file()})
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
    failed), and the counts."""
    tests: dict[str, str] = {}
    for f in xml_files:
        for case in ET.parse(f).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            tests[name] = "failed" if tests.get(name) == "failed" else outcome  # a setup error and a pass: failed
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "skipped", "failed")}
    return {**counts, "tests": dict(sorted(tests.items()))}


def record(out: Path, xml_files: list[Path], device: str, root: Path = ROOT) -> Path | None:
    """Write the tests' outcomes into `out`; None (nothing written) where every test skipped: tests that all
    skip (no CUDA) say nothing about the GPU."""
    summary = summarise(xml_files)
    if not (summary["passed"] or summary["failed"]):
        return None
    env = environment(device, root)
    path = record_file(out, env["device"])
    atomic_write_json(path, {**env, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **summary})
    return path


def check(folder: Path, device: str, root: Path = ROOT) -> tuple[bool, str]:
    """(True, what it holds) where `folder` holds the tests' outcomes for this device, sources, torch and CUDA;
    else (False, why not)."""
    env = environment(device, root)
    path = record_file(folder, env["device"])
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"no record of them on {env['device']} ({path})"
    except (OSError, ValueError) as e:
        return False, f"{path} is unreadable ({e})"
    if not isinstance(rec, dict):
        return False, f"{path} is not a record (a JSON object)"
    changed = [k for k in KEYS if rec.get(k) != env[k]]
    if changed:
        what = ", ".join("the sources" if k == "digest" else f"{k} {rec.get(k)!r} -> {env[k]!r}" for k in changed)
        return False, f"{path}: {what} changed since they ran"
    tests = rec.get("tests")
    failed = [n.split("::")[-1] for n, o in tests.items() if o == "failed"] if isinstance(tests, dict) else []
    return True, (f"{rec.get('passed')} passed, {rec.get('skipped')} skipped, {rec.get('failed')} failed"
                  f"{' (' + ', '.join(failed) + ')' if failed else ''} on {env['device']} at {rec.get('date')} "
                  f"with these sources, torch {env['torch']} and CUDA {env['cuda']} ({path})")


def main(argv: list[str] | None = None) -> int:
    """check: exit 0 when the tests ran here already, 3 when they are to run; record: write it, exit 0."""
    p = argparse.ArgumentParser(prog="python -m resnet_lab.gputests", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="exit 0 if FOLDER holds the tests' outcomes for this device, sources, torch")
    c.add_argument("folder", type=Path)
    r = sub.add_parser("record", help="write OUT/<device>-tests.json unless every test in the junit files skipped")
    r.add_argument("out", type=Path)
    r.add_argument("xml", type=Path, nargs="+")
    for sp in (c, r):
        sp.add_argument("--device", default="cuda", help="auto, cpu or cuda[:N] (default cuda)")
    a = p.parse_args(argv)
    if a.cmd == "check":
        ok, why = check(a.folder, a.device)
        print(f"GPU tests {'ran here already' if ok else 'to run'}: {why}")
        return 0 if ok else 3
    try:
        s = summarise(a.xml)
    except (OSError, ET.ParseError) as e:
        p.error(f"a junit file is missing or unreadable: {e}")
    path = record(a.out, a.xml, a.device)
    print(f"GPU tests: {s['passed']} passed, {s['skipped']} skipped, {s['failed']} failed: "
          + (f"recorded in {path}" if path else "all skipped, nothing recorded"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
