"""Moving run folders between machines: the GPU machine trains, this one reports.

`export_runs` packs the run store into a gzipped tar split into parts no larger than a limit (the
device tool brings back files of at most 16 MiB); checkpoints of unfinished runs go along only when
asked, so a later GPU session can resume them. `import_runs` merges parts into a store, keeping
whichever copy of each run is further along, and never lets an archive write outside it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .runs import runs_dir

RANK = {None: 0, "failed": 1, "running": 2, "diverged": 3, "done": 3}


def _progress(summary: dict | None) -> tuple[int, int]:
    s = summary or {}
    return RANK.get(s.get("status"), 0), int(s.get("steps_done") or 0)


def _summary(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def export_runs(dest: str | os.PathLike, root: str | os.PathLike | None = None, checkpoints: bool = False,
                part_mb: float = 15.0, name: str = "runs") -> list[Path]:
    """Write `<dest>/<name>.tar.gz.000`, `.001`, ...: every run folder of the store, without
    checkpoints unless `checkpoints` (then only unfinished runs' newest one). Returns the parts."""
    src = runs_dir(root)
    if part_mb <= 0:
        raise ValueError(f"part_mb={part_mb!r} is not valid: use a positive size in MiB")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for run in sorted(p for p in src.iterdir() if p.is_dir()) if src.exists() else []:
            done = (_summary(run) or {}).get("status") in ("done", "diverged")
            for f in sorted(run.iterdir()):
                keep = f.name in ("config.json", "summary.json", "metrics.csv", "model.pt")
                keep |= checkpoints and not done and f.name == "checkpoint.pt"
                if keep and f.is_file():
                    tar.add(f, arcname=f"{run.name}/{f.name}")
    data, size = buf.getvalue(), int(part_mb * 2**20)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, max(len(data), 1), size):
        p = dest / f"{name}.tar.gz.{i // size:03d}"
        p.write_bytes(data[i:i + size])
        parts.append(p)
    return parts


def import_runs(parts: list[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, str]:
    """Merge exported parts (all of one export, in any order) into the store: {run hash: what happened}.

    A run is taken when the store lacks it or has it less far along (failed < running at fewer steps
    < running at more < done); a finished local run is never replaced.
    """
    parts = sorted(Path(p) for p in parts)
    stems = {p.name.rsplit(".", 1)[0] for p in parts}
    if len(stems) != 1:
        raise ValueError(f"parts of more than one export given: {sorted(stems)}")
    data = b"".join(p.read_bytes() for p in parts)
    dst = runs_dir(root)
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, \
            tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp, filter="data")  # refuses absolute paths, '..', links out of tmp, devices
        for run in sorted(Path(tmp).iterdir()):
            if not run.is_dir():
                continue
            local = dst / run.name
            mine, theirs = _progress(_summary(local)), _progress(_summary(run))
            if local.exists() and mine >= theirs:
                out[run.name] = "kept local"
                continue
            staged = dst / f".{run.name}.importing"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.move(str(run), staged)
            old = dst / f".{run.name}.replaced"
            if local.exists():  # move aside first: at every moment one complete copy exists
                os.replace(local, old)
            os.replace(staged, local)
            shutil.rmtree(old, ignore_errors=True)
            out[run.name] = "imported"
    return out
