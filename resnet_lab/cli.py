"""`resnet-lab` command line: train | data info (| sweep | report | bench as they land)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from .config import ARCHS, PRESETS, SHORTCUTS, RunConfig


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    """--set values are JSON (numbers, lists, null, true) or plain strings."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        v = text
    if field.name == "milestones" and isinstance(v, list):
        v = tuple(v)
    return v


def _overrides(pairs: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep:
            raise SystemExit(f"--set {p!r}: use KEY=VALUE")
        if key not in fields:
            raise SystemExit(f"--set {key!r}: unknown field; allowed are {sorted(fields)}")
        out[key] = _parse_value(fields[key], val)
    return out


def cmd_train(a: argparse.Namespace) -> int:
    from .config import make_config
    from .train import train

    kw = dict(arch=a.arch, depth=a.depth, shortcut=a.shortcut, block_layers=a.block_layers, seed=a.seed)
    kw.update(_overrides(a.set or []))
    try:
        cfg = make_config(a.preset, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    rec = train(cfg, device=None if a.device == "auto" else a.device, progress=not a.quiet)
    s = rec.summary
    print(f"{cfg.name} [{cfg.preset}] {s.get('status')}: train err {100 * (s.get('final_train_err') or 0):.2f}%  "
          f"test err {100 * (s.get('final_test_err') or 0):.2f}%  params {s.get('params'):,}  "
          f"{s.get('wall_seconds', 0):.1f}s on {s.get('device')}\n  {rec.path}")
    return 0 if rec.status == "done" else 1


def cmd_data_info(a: argparse.Namespace) -> int:
    from .data import DataError, load_cifar10

    try:
        d = load_cifar10(a.source)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    counts = d.train_y.bincount(minlength=10).tolist()
    info = {**d.info.to_json(), "train_per_class": counts, "test_per_class": d.test_y.bincount(minlength=10).tolist()}
    print(json.dumps(info, indent=2))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import build

    try:
        table = build(a.preset, only=a.only, kernel=a.kernel)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(table.to_string(index=False))
    return int((table["status"] != "done").sum())


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import markdown, run_bench

    try:
        models = [int(m) for m in a.models.split(",")]
    except ValueError:
        raise SystemExit(f"error: --models {a.models!r}: use comma-separated depths, e.g. 20,56,110")
    res = run_bench(models, a.device, a.seconds, a.batch_size, a.num_workers, checkpointing=a.checkpointing)
    print(markdown(res))
    print("written:", *res["paths"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-lab", description="Reproduce why ResNets work, on CIFAR-10.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config (or return it from the run store)",
                       description="Train one net with a preset's recipe; a finished config is not retrained.")
    t.add_argument("--arch", default="resnet", choices=ARCHS)
    t.add_argument("--depth", type=int, default=20, help="6n+2 (9n+2 for bottlenecks)")
    t.add_argument("--shortcut", default="A", choices=SHORTCUTS)
    t.add_argument("--block-layers", type=int, default=2, choices=(1, 2, 3))
    t.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any RunConfig field")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="dataset commands")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("info", help="source, sha256 and counts of the CIFAR-10 copy in use")
    di.add_argument("--source", default=None, help="path (default: $RESNET_LAB_DATA, then data/)")
    di.set_defaults(func=cmd_data_info)

    r = sub.add_parser("report", help="rebuild every table and figure from stored runs (trains nothing)",
                       description="Re-execute each notebook with train_missing=False into results/<preset>/.")
    r.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    r.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook stems, e.g. 01_degradation")
    r.add_argument("--kernel", default="resnet-lab", help="Jupyter kernel name (default: resnet-lab)")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="images/s of our loop vs the usual DataLoader loop, same process",
                       description="Writes results/bench/<device>.json and .md, and prints the table.")
    b.add_argument("--models", default="20,56", help="comma-separated depths (default 20,56)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--seconds", type=float, default=10.0, help="measuring time per loop and model")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--num-workers", type=int, default=4, help="baseline DataLoader workers")
    b.add_argument("--checkpointing", action="store_true", help="also time activation checkpointing")
    b.set_defaults(func=cmd_bench)

    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
