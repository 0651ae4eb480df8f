"""`resnet-lab` command line: train, analyse, sweep, report, bench, runs (export | manifest | import), data info."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from .config import ARCHS, NON_RESULT_FIELDS, PRESETS, SHORTCUTS, RunConfig

log = logging.getLogger(__name__)

# `train` flags that describe one net (--notebook and --sweep take a grid instead) and flags that only mean
# something for several runs (--notebook, --sweep); each is refused where it would be ignored.
SINGLE_RUN_FLAGS = ("arch", "depth", "shortcut", "block_layers", "seed")
NOTEBOOK_FLAGS = ("param", "pack", "pack_mb", "group")
TRAINING_FLAGS = ("time_budget", "pack", "pack_mb", "group")  # --list trains nothing
# exit codes of every command: 0 all done, 1 some run/point/notebook failed or is missing (the output says
# which), 2 bad input (argparse's), 130 interrupted; a count would read as 2 or 130 and wrap at 256
EXIT_INCOMPLETE = 1
EXIT_INTERRUPTED = 130  # the shell's code for a tool ended by SIGINT (Ctrl-C)
EXIT_BROKEN_PIPE = 141  # the shell's code for a tool ended by SIGPIPE: its reader went away
# -p names that have a flag of their own: the flag is what the command reads, so a -p would be ignored
PARAM_FLAGS = {"preset": "--preset", "device": "--device"}


def usage_error(message: object) -> NoReturn:
    """Bad input (a flag, a value, a grid): one line on stderr and exit code 2, argparse's, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _flag(dest: str) -> str:
    return "-p/--param" if dest == "param" else "--" + dest.replace("_", "-")


def _given(a: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    """The flags among `dests` that were given (argparse defaults are None or False)."""
    return [_flag(d) for d in dests if getattr(a, d, None) not in (None, False, [])]


def _parse_value(field: dataclasses.Field | None, text: str) -> Any:
    """--set / -p values are JSON (numbers, lists, null, true) or plain strings."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        v = text
    if field is not None and field.name == "milestones" and isinstance(v, list):
        v = tuple(v)
    return v


def _check_device(device: str, need: bool = True, what: str = "--device") -> str:
    """The device, if it is auto|cpu|cuda|cuda:N and (when `need`: it will be used) this machine has it; else a
    usage error naming `what` gave it (torch.device would raise deep inside, after a run folder was made)."""
    from .config import DEVICE

    if not DEVICE.fullmatch(device):
        usage_error(f"{what} {device!r} is not valid: use auto, cpu, cuda or cuda:N")
    from .sweep import device_missing

    if need and (why := device_missing(device)):
        usage_error(f"{what} {device}: {why}")
    return device


def _overrides(pairs: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep:
            usage_error(f"--set {p!r}: use KEY=VALUE")
        if key == "preset":
            usage_error(f"--set preset=...: give the preset with --preset (one of {sorted(PRESETS)})")
        if key not in fields:
            usage_error(f"--set {key!r}: unknown field; allowed are {sorted(fields)}")
        if key == "dataset":  # the source's sha256 prefix, filled in from it: another value names no data here
            usage_error("--set dataset=...: a run's dataset is the id of the CIFAR-10 copy it reads, set from "
                        "RESNET_LAB_DATA (`resnet-lab data` shows it), not a setting")
        out[key] = _parse_value(fields[key], val)
    return out


def _check_train_flags(a: argparse.Namespace) -> None:
    """Every flag of `train` acts or is refused by name: none is silently ignored."""
    if a.notebook or a.sweep:
        given = _given(a, SINGLE_RUN_FLAGS)
        if given:
            seeds = f" (seeds too: -p 'seeds=[{a.seed}]')" if a.seed is not None else ""
            how = "set it with -p NAME=VALUE" if a.notebook else "the grid file sets it"
            usage_error(f"{'--notebook' if a.notebook else '--sweep'} takes a grid; {how}{seeds}, "
                        f"not {', '.join(given)}")
        # --set of a speed-only field (not hashed: the grid's runs stay the same runs) applies to every run
        result_keys = [k for k in (kv.partition("=")[0] for kv in a.set or []) if k not in NON_RESULT_FIELDS]
        if result_keys:
            usage_error(f"--set {', '.join(result_keys)} would change the runs a grid names: "
                        f"{'set it with -p NAME=VALUE' if a.notebook else 'the grid file sets them'}; with "
                        f"{'--notebook' if a.notebook else '--sweep'}, --set takes only the speed-only fields "
                        f"{sorted(NON_RESULT_FIELDS)}, e.g. --set compile=true")
    elif _given(a, NOTEBOOK_FLAGS):
        usage_error(f"{', '.join(_given(a, NOTEBOOK_FLAGS))} apply to several runs: use them with --notebook STEM "
                    f"or --sweep GRID, or drop them to train one net")
    if a.list and _given(a, TRAINING_FLAGS):
        usage_error(f"--list trains nothing: drop {', '.join(_given(a, TRAINING_FLAGS))}")
    if a.pack is not None and a.pack < 1:
        usage_error(f"--pack {a.pack} is not valid: use an integer >= 1 (runs stepped together)")
    if a.pack_mb is not None and not 0 < a.pack_mb < float("inf"):
        usage_error(f"--pack-mb {a.pack_mb} is not valid: use a positive number of MiB (checkpoints per pack)")
    if a.time_budget is not None and not a.time_budget > 0:
        usage_error(f"--time-budget {a.time_budget} is not valid: use a number of seconds > 0")


def _default(value: Any, default: Any) -> Any:
    """`value` unless the flag was not given: `a.depth or 20` would turn --depth 0 into 20."""
    return default if value is None else value


def cmd_train(a: argparse.Namespace) -> int:
    _check_train_flags(a)
    try:
        if a.notebook or a.sweep:
            return _train_notebooks(a)
        return _train_one(a)
    except KeyboardInterrupt as e:  # a first Ctrl-C: train stopped the runs at a step boundary, with a checkpoint,
        # and its message names them; a second one ended at once, and they resume from their last periodic one
        print(f"interrupted (Ctrl-C): {e}" if str(e) else
              "interrupted (Ctrl-C): the same command resumes each run from its last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train_one(a: argparse.Namespace) -> int:
    """`train` of one net (no --notebook/--sweep)."""
    from .config import make_config

    kw = dict(arch=_default(a.arch, "resnet"), depth=_default(a.depth, 20), shortcut=_default(a.shortcut, "A"),
              block_layers=_default(a.block_layers, 2), seed=_default(a.seed, 0))
    kw.update(_overrides(a.set or []))
    try:
        cfg = make_config(a.preset or "quick", **kw)
    except ValueError as e:
        usage_error(e)
    # a milestone past the end never fires; only where --set gave it (a preset's, with --set iterations shorter,
    # is that preset's schedule cut short, as experiments.CPU_1202 cuts smoke's)
    late = [m for m in cfg.milestones if m >= cfg.iterations] if "milestones" in kw else []
    if late:
        usage_error(f"milestones {late} are not before iterations={cfg.iterations} (they never fire): use "
                    "milestones below it, or raise iterations")
    _check_device(a.device, need=not a.list)
    from .experiments import with_dataset
    from .transfer import finished_in

    skip = _manifest(a.skip) or {}  # bad input is refused before the dataset is read
    cfg = with_dataset([cfg])[0]
    elsewhere = {cfg.hash: skip[cfg.hash]} if finished_in(skip.get(cfg.hash)) else {}
    if a.list:
        _list_runs([cfg], elsewhere, a.skip)
        return 0
    if elsewhere:  # finished on the machine that wrote the manifest: a fresh GPU machine does not redo it
        print(f"{cfg.name} seed {cfg.seed}: {elsewhere[cfg.hash]['status']} in {a.skip} (not trained here)")
        return 0
    from .runs import FINISHED
    from .train import train

    rec = train(cfg, device=None if a.device == "auto" else a.device, progress=not a.quiet,
                time_budget_s=a.time_budget)
    _print_run(rec)
    return 0 if rec.status in FINISHED else EXIT_INCOMPLETE  # diverged is a result (its line says so)


def _list_runs(cfgs: list[RunConfig], elsewhere: dict[str, dict] | None = None, where: str = "") -> None:
    """One line per config: hash, name, seed, stored status (missing when never started) and steps done; a run
    `elsewhere` (finished in a --skip manifest) shows that store's status."""
    from .runs import RunDir, can_resume

    elsewhere = elsewhere or {}
    for c in cfgs:
        rd = RunDir(c)
        s = elsewhere.get(c.hash) or rd.summary() or {}
        status = s.get("status", "missing") if c.hash in elsewhere else rd.live_status() or "missing"
        note = f"  (in {where}: not trained here)" if c.hash in elsewhere else ""
        if status == "stopped" and s.get("steps_done") and not can_resume(rd.path):
            note = "  (no checkpoint here: it starts again at step 0)"  # its progress came without one
        print(f"{c.hash}  {c.name:24s} seed {c.seed}  {status:8s} step {s.get('steps_done', 0)}/{c.iterations}{note}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"  # a run stopped early has no final error yet, not 0%


def _print_run(rec) -> None:
    from .runs import can_resume
    from .train import LOCKED

    s, cfg = rec.summary, rec.config
    status = s.get("status")
    if status == LOCKED:  # another process holds it (a time budget waits for no lock)
        print(f"{cfg.name} seed {cfg.seed}: held by another process (a trainer or an import): left to it")
        return
    if status == "failed":  # e.g. a run that could not start, reached by no sitting since: no metrics to show
        print(f"{cfg.name} seed {cfg.seed}: failed ({s.get('error', 'no error recorded')}; see "
              f"{rec.path / 'summary.json'})")
        return
    if status == "running":  # this process is done with it: cut short, now or by an earlier call
        how = "resumes from its checkpoint" if can_resume(rec.path) else "no checkpoint here: starts at step 0"
        status = f"stopped ({how} when run again; {cfg.iterations:,} iterations in all)"
    print(f"{cfg.name} seed {cfg.seed} [{cfg.preset}] {status} at step {s.get('steps_done')}: "
          f"train err {_pct(s.get('final_train_err'))}  test err {_pct(s.get('final_test_err'))}  "
          f"params {s.get('params') or 0:,}  {s.get('wall_seconds') or 0:.1f}s on {s.get('device')} "
          f"({s.get('step_mode', '?')} step, {s.get('packed_runs', 1)} packed"
          f"{', grouped' if s.get('grouped_runs') else ''})\n  {rec.path}")


def _grids_and_params(a: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The --sweep grids, checked, and the parameters every --notebook takes: -p pairs and a preset (--preset,
    else the grids' one preset, else quick). Bad input exits 2 naming it."""
    from .sweep import load_grid

    if a.param and not a.notebook:
        usage_error("-p/--param sets a --notebook's parameters; a --sweep grid sets its own (edit the YAML)")
    grids, presets = [], set()
    try:
        for path in a.sweep or []:
            grid = load_grid(path)
            if a.preset is not None and a.preset != grid.preset:
                raise ValueError(f"--preset {a.preset} but {path} sets preset {grid.preset}: drop --preset "
                                 f"(a grid names its own) or edit the grid")
            presets.add(grid.preset)
            grids.append(grid)
    except ValueError as e:
        usage_error(e)
    if a.notebook and a.preset is None and len(presets) > 1:  # which one a --notebook takes is not ours to guess
        usage_error(f"the --sweep grids name presets {sorted(presets)}, so --notebook has none to take: train the "
                    "notebook in a call of its own, with --preset")
    params = {"preset": a.preset or (presets.pop() if len(presets) == 1 else "quick")}
    for pair in a.param or []:
        key, sep, val = pair.partition("=")
        if not sep:
            usage_error(f"-p {pair!r}: use NAME=VALUE")
        if key in PARAM_FLAGS:
            usage_error(f"-p {key}=...: give the {key} with {PARAM_FLAGS[key]}, which is what this command uses")
        params[key] = _parse_value(None, val)
    return grids, params


def _device(a: argparse.Namespace, grids: list[Any], need: bool = True) -> str:
    """The device to use: --device, or with --device auto the one device the --sweep grids set (`fixed:` or
    swept `device:`), so a grid's device is honoured, never silently overridden. A grid device that differs
    from an explicit --device, or grids that set several, are refused (each run is trained once)."""
    same = lambda d: "cuda:0" if d == "cuda" else d  # one device, two spellings
    named: dict[str, str] = {}  # device -> the grid that sets it
    for g in grids:
        values = [*g.parameters.get("device", []), *([g.fixed["device"]] if "device" in g.fixed else [])]
        for v in values:
            if v != "auto" and not any(same(v) == same(n) for n in named):
                named[v] = str(g.source)
    clash = {v: src for v, src in named.items() if same(v) != same(a.device)} if a.device != "auto" else {}
    if clash or len(named) > 1:
        sets = ", ".join(f"{src} sets device {v}" for v, src in (clash or named).items())
        usage_error(f"{sets}{f' but --device is {a.device}' if clash else ''}: a --sweep grid's device is used when "
                    f"--device is auto, and each run trains once on one device; give a --device the grids agree with "
                    f"or edit the grid")
    if a.device == "auto" and named:
        device, src = next(iter(named.items()))
        return _check_device(device, need, f"{src} sets device")
    return _check_device(a.device, need)


def _check_notebook(nb: str, params: dict[str, Any], command: str = "train") -> None:
    """A --notebook stem the suite knows, given only parameters it declares and this command uses (ValueError
    otherwise): `train` uses those that name the runs, `analyse` those and the analysis settings; any other
    (train_missing, a figure's setting) would be accepted and ignored. Values: `sweep.check_params`."""
    from . import experiments as ex

    declared = ex.notebook_defaults(nb)  # an unknown notebook: a ValueError naming the known ones
    if set(params) - set(declared):
        raise ValueError(f"{nb} has no parameter(s) {sorted(set(params) - set(declared))}: it takes "
                         f"{sorted(declared)}")
    used = set(ex.NOTEBOOK_CONFIGS[nb][1]) - {"preset"}
    if command == "analyse":
        used |= set(ex.NOTEBOOK_ANALYSES[nb].reads if nb in ex.NOTEBOOK_ANALYSES else ())
    ignored = sorted(set(params) - used - {"preset"})
    if ignored:
        raise ValueError(f"{nb}'s {', '.join(ignored)} would change nothing `{command}` does: it takes "
                         f"{', '.join(sorted(used)) or 'no parameter'} (the rest are the notebook's own, set when "
                         "it runs)")


def _train_notebooks(a: argparse.Namespace) -> int:
    """Every run the named notebooks and sweep grids need, packed on the GPU, without Jupyter (the GPU machine
    has none). Grids first, in the order given, then notebooks; a run both need is trained once."""
    from . import experiments as ex
    from .data import DataError
    from .runs import FINISHED, RunDir
    from .sweep import check_params, grid_configs
    from .transfer import finished_in

    grids, params = _grids_and_params(a)
    device = _device(a, grids, need=not a.list)
    skip = _manifest(a.skip) or {}  # bad input is refused before the dataset is read
    try:
        cfgs = [c for grid in grids for c in grid_configs(grid)]
        for nb in a.notebook or []:
            _check_notebook(nb, params)
            check_params(params)  # counts and device: what a value passes types with and still fails later
            cfgs += ex.configs_for(nb, params)
        speed = _overrides(a.set or [])  # speed-only fields (checked above): hashes, so runs, unchanged
        cfgs = [dataclasses.replace(c, **speed) for c in ex.with_dataset(ex.unique_runs(cfgs))]
        pack = a.pack if a.pack is not None else ex.pack_size(None if device == "auto" else device)
        group = a.group or ex.group_seeds()
        if group and pack < 2:  # grouping happens inside a pack: with one run per pack it would do nothing
            if a.group:
                raise ValueError(f"--group trains the seeds of one config as one net inside a pack, and a pack "
                                 f"here holds {pack} run: give --pack 2 or more (on a CPU the default is 1)")
            log.warning("RESNET_LAB_GROUP=1, but a pack holds one run here (--pack %d): nothing is grouped", pack)
    except DataError:
        raise  # the machine's dataset, not the command line: main says it (exit 1)
    except ValueError as e:
        usage_error(e)
    elsewhere = {c.hash: skip[c.hash] for c in cfgs if finished_in(skip.get(c.hash))}
    if not cfgs:  # 07 (it times ImageNet nets, trains none): said, not an empty line
        print(f"no runs: {', '.join([*(a.sweep or []), *(a.notebook or [])])} trains none", file=sys.stderr)
        return 0
    if a.list:
        _list_runs(cfgs, elsewhere, a.skip)
        return 0
    for c in cfgs:
        if c.hash in elsewhere:
            print(f"{c.name} seed {c.seed}: {elsewhere[c.hash]['status']} in {a.skip} (not trained here)")
    cfgs = [c for c in cfgs if c.hash not in elsewhere]
    recs = ex.train_all(cfgs, device=device, pack=pack, group=group, progress=not a.quiet,
                        time_budget_s=a.time_budget, pack_mb=a.pack_mb) if cfgs else []
    for c, rec in zip(cfgs, recs):
        if rec is not None:
            _print_run(rec)
        elif (RunDir(c).summary() or {}).get("status") == "failed":
            print(f"{c.name} seed {c.seed}: failed (see {RunDir(c).summary_file})")
        elif a.time_budget is not None:  # never started: the budget was spent on the runs before it
            print(f"{c.name} seed {c.seed}: not started, --time-budget {a.time_budget:g} s spent (run again to go on)")
        else:
            print(f"{c.name} seed {c.seed}: failed (see the log above)")
    return EXIT_INCOMPLETE if any(r is None or r.status not in FINISHED for r in recs) else 0


def cmd_analyse(a: argparse.Namespace) -> int:
    """Compute and cache, in each finished run's folder, the analyses the notebooks' executions for these grid
    points or notebook parameters will read (04's lesions and gradients: hours on a CPU, minutes on a GPU)."""
    from . import experiments as ex
    from .data import DataError
    from .sweep import check_params, expand, params_label

    if not (a.notebook or a.sweep):
        usage_error("name what to analyse: --sweep GRID (its points) or --notebook STEM [-p NAME=VALUE]")
    grids, params = _grids_and_params(a)
    device = _device(a, grids)
    targets = [(pt.notebook, pt.params, pt.label) for grid in grids for pt in expand(grid)]
    try:
        for nb in a.notebook or []:
            _check_notebook(nb, params, "analyse")
            targets.append((nb, params, params_label(params)))
        for nb, p, label in targets:  # counts (draws, eval_images...) before anything loads: a bad one runs minutes
            try:
                check_params(p)
            except ValueError as e:
                raise ValueError(f"{nb} {label}: {e}") from None
    except ValueError as e:
        usage_error(e)
    todo = [t for t in targets if t[0] in ex.NOTEBOOK_ANALYSES]
    if not todo:
        usage_error(f"nothing to analyse in {sorted({t[0] for t in targets})}: only "
                    f"{', '.join(sorted(ex.NOTEBOOK_ANALYSES))} cache(s) analyses for a report "
                    "(the others' notebooks compute theirs when they run)")
    for nb in sorted({t[0] for t in targets} - set(ex.NOTEBOOK_ANALYSES)):  # said, not silently dropped
        print(f"{nb}: caches no analysis for a report (its notebook computes its tables when it runs): nothing to do")
    not_done = 0
    for nb, p, label in todo:
        try:
            done, diverged, missing = ex.analyse_notebook(nb, p, device=device)
        except DataError:
            raise
        except ValueError as e:
            usage_error(f"{nb} {label}: {e}")
        not_done += len(missing)
        print(f"{nb} {label}: analysed {len(done)} finished run(s): {', '.join(c.name for c in done) or '-'}"
              + (f"; diverged (its tables leave it out): {', '.join(c.name for c in diverged)}" if diverged else "")
              + (f"; no finished model in this store: {', '.join(c.name for c in missing)}" if missing else ""))
    return EXIT_INCOMPLETE if not_done else 0


def cmd_data_info(a: argparse.Namespace) -> int:
    from .data import load_cifar10

    if a.source is not None and not a.source.strip():  # '' would be read as the current folder
        usage_error(f"--source {a.source!r} is empty: give a CIFAR-10 archive, folder or tarball, or leave it out")
    d = load_cifar10(a.source)  # no copy, a damaged one: main says it in one line
    counts = d.train_y.bincount(minlength=10).tolist()
    info = {**d.info.to_json(), "train_per_class": counts, "test_per_class": d.test_y.bincount(minlength=10).tolist()}
    print(json.dumps(info, indent=2))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import build

    try:
        table = build(a.preset, only=a.only, kernel=a.kernel, force=a.force)
    except ValueError as e:
        usage_error(e)
    print(table.to_string(index=False))
    from .runs import results_dir

    claims = results_dir() / a.preset / "claims.md"
    if claims.exists():
        print("\n" + claims.read_text())
    return EXIT_INCOMPLETE if (table["status"] != "done").any() else 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import check_args, markdown, run_bench

    try:
        models = [int(m) for m in a.models.split(",")]
    except ValueError:
        usage_error(f"--models {a.models!r}: use comma-separated depths 6n+2, e.g. 20,56,110")
    try:
        packs = [int(m) for m in a.packs.split(",") if m] if a.packs != "auto" else None  # counts: check_args
    except ValueError:
        usage_error(f"--packs {a.packs!r}: use 'auto' or comma-separated run counts >= 1, e.g. 1,2,4,8")
    out = Path(a.out) if a.out else None
    try:
        check_args(models, a.seconds, a.batch_size, a.num_workers, packs, out, a.tag)
    except ValueError as e:
        usage_error(str(e))
    _check_device(a.device)
    if packs is None:  # packing is about filling a GPU; on a CPU the cores are already busy
        from .train import resolve_device

        packs = [1, 2, 4, 8] if resolve_device(a.device).type == "cuda" else []
    res = run_bench(models, a.device, a.seconds, a.batch_size, a.num_workers, checkpointing=a.checkpointing,
                    packs=packs, profile=a.profile, out=out, compile=a.compile, fp16=a.fp16,
                    tag=a.tag)
    print(markdown(res))
    print("written:", *res["paths"])
    failed = [f"{r['model']}{' x' + str(r['runs']) if 'runs' in r else ''} {k[:-len('_error')]}: {v}"
              for r in res["rows"] + res["packed"] for k, v in r.items() if k.endswith("_error")]
    for f in failed:
        print("failed:", f, file=sys.stderr)
    return EXIT_INCOMPLETE if failed else 0


def cmd_runs_export(a: argparse.Namespace) -> int:
    from .transfer import export_runs

    skip = _manifest(a.skip)
    only = _to_analyse(a.to_analyse) if a.to_analyse else None
    if only is not None and a.unfinished:
        usage_error("--to-analyse sends finished runs, --unfinished only unfinished ones: export them apart")
    try:
        parts = export_runs(a.dest, checkpoints=a.checkpoints, part_mb=a.part_mb, name=a.name, skip=skip,
                            max_mb=a.max_mb, unfinished=a.unfinished, sent=a.sent, only=only)
    except ValueError as e:
        usage_error(e)
    except OSError as e:  # the disk, not the input
        raise SystemExit(f"error: {e}")
    for p in parts:
        print(p, f"{p.stat().st_size / 2**20:.1f} MiB")
    print(f"{len(parts.runs)} run(s) in this export", file=sys.stderr)
    if parts.held_by_skip:
        print(f"{len(parts.held_by_skip)} left out: {a.skip} has them as far along", file=sys.stderr)
    if parts.held_by_sent:  # the ledger says sent, not received: a lost part is sent again without it
        print(f"{len(parts.held_by_sent)} left out: {a.sent} says an earlier export from here sent them (if its "
              f"parts did not arrive, delete {a.sent} and export again)", file=sys.stderr)
    if parts.never_fit:  # missing from this export and from every one under --max-mb (the warning says how)
        print(f"not exported, over --max-mb {a.max_mb:g} on its own: {', '.join(parts.never_fit)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


def _to_analyse(paths: list[str]) -> set[str]:
    """The finished runs of these grids' points whose cached analyses are missing (bad grids exit 2)."""
    from . import experiments as ex
    from .data import DataError
    from .runs import runs_dir
    from .sweep import expand, load_grid

    only: set[str] = set()
    try:
        for path in paths:
            grid = load_grid(path)
            if grid.notebook not in ex.NOTEBOOK_ANALYSES:
                raise ValueError(f"--to-analyse {path}: its notebook {grid.notebook} caches no analysis; only "
                                 f"{', '.join(sorted(ex.NOTEBOOK_ANALYSES))} do")
            for pt in expand(grid):
                only.update(ex.unanalysed_runs(pt.notebook, pt.params))
    except DataError:  # no dataset copy: the machine, not the input
        raise
    except ValueError as e:
        usage_error(e)
    bare = sorted(h for h in only if not (runs_dir() / h / "model.pt").is_file())  # restored from their records
    print(f"--to-analyse: {len(only) - len(bare)} finished run(s) without the cached analyses of {' '.join(paths)}"
          + (f"; {len(bare)} more without their weights too (restored from records: only training them again "
             f"would give them): {', '.join(bare)}" if bare else ""), file=sys.stderr)
    return only - set(bare)


def _manifest(path: str | None) -> dict[str, dict] | None:
    """The --skip manifest, or None; an unreadable one is a usage error naming the file."""
    from .transfer import read_manifest

    if path is None:
        return None
    try:
        return read_manifest(path)
    except ValueError as e:
        usage_error(f"--skip {e}")


def cmd_runs_manifest(a: argparse.Namespace) -> int:
    from .transfer import manifest

    text = json.dumps(manifest(), indent=1, sort_keys=True)
    if a.out is None:
        print(text)
        return 0
    from .runs import atomic_write_text

    try:
        atomic_write_text(a.out, text + "\n")
    except (IsADirectoryError, NotADirectoryError, FileExistsError):  # a folder, or a file in the path's way
        usage_error(f"{a.out!r} cannot be a manifest file (a folder is there, or a file is in its path): "
                    f"give a file name, e.g. .gpu-in/have.json")
    except OSError as e:  # the disk, not the input: named as given (not the temp file beside it)
        raise SystemExit(f"error: cannot write the manifest {a.out!r}: {e.strerror or e}")
    return 0


def cmd_runs_import(a: argparse.Namespace) -> int:
    from .records import restore
    from .transfer import PART_NUMBER, import_runs

    # one folder, not named like a part (.000, .001, ...): run records (results/<preset>/runs)
    folder = len(a.parts) == 1 and Path(a.parts[0]).is_dir() \
        and not PART_NUMBER.fullmatch(a.parts[0].rpartition(".")[2])
    try:
        done = restore(a.parts[0]) if folder else import_runs(a.parts)
    except ValueError as e:
        usage_error(e)
    except OSError as e:  # the store's disk (an unreadable part is a ValueError: bad input)
        raise SystemExit(f"error: {e}")
    if folder and not done:  # nothing imported: an export's folder is a mistake; a records folder may be empty
        exports = sorted({p.name.rpartition(".")[0] for p in Path(a.parts[0]).glob("*.tar.gz.*")
                          if PART_NUMBER.fullmatch(p.name.rpartition(".")[2])})
        if exports:
            usage_error(f"{a.parts[0]} holds export parts, not run records: pass them: "
                        + " or ".join(f"resnet-lab runs import {Path(a.parts[0]) / stem}.*" for stem in exports))
        print(f"no run records in {a.parts[0]} (folders named by a run's 12-hex hash): nothing imported",
              file=sys.stderr)
    for h, what in done.items():
        print(h, what)
    return EXIT_INCOMPLETE if any(what.startswith(("skipped", "not restored")) for what in done.values()) else 0


class Parser(argparse.ArgumentParser):
    """argparse with the project's bad-input line: `error: ...` and where to look, not the whole usage (exit 2).
    Subcommands' parsers are of this class too (add_subparsers makes its parsers of the parent's type)."""

    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="resnet-lab", description="Reproduce why ResNets work, on CIFAR-10.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config, or every run of some notebooks (finished runs are kept)",
                       description="Train one net with a preset's recipe, or with --notebook/--sweep every run "
                                   "those notebooks or grids need (small nets packed on a GPU). A finished config is not retrained; "
                                   "an interrupted one resumes.")
    t.add_argument("--arch", default=None, choices=ARCHS, help="default resnet")
    t.add_argument("--depth", type=int, default=None, help="6n+2 (9n+2 for bottlenecks); default 20")
    t.add_argument("--shortcut", default=None, choices=SHORTCUTS, help="default A")
    t.add_argument("--block-layers", type=int, default=None, choices=(1, 2, 3), help="default 2")
    t.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default quick (a --sweep grid names its own)")
    t.add_argument("--seed", type=int, default=None, help="default 0; with --notebook use -p 'seeds=[...]'")
    t.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (auto with --sweep: the grid's device, if it sets one)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any RunConfig field; with --notebook/--sweep only the speed-only ones "
                        f"({', '.join(sorted(NON_RESULT_FIELDS))}), e.g. --set compile=true")
    t.add_argument("--notebook", action="append", metavar="STEM",
                   help="train every run this notebook needs (repeatable), e.g. 02_depth")
    t.add_argument("--sweep", action="append", metavar="GRID",
                   help="train every run this sweep grid's points need (repeatable), e.g. sweeps/depth.yaml; "
                        "no notebook is executed (the GPU machine has no Jupyter): `resnet-lab sweep` then finds "
                        "them stored")
    t.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="with --notebook: a notebook parameter, JSON value, e.g. -p 'seeds=[0,1,2]'")
    t.add_argument("--pack", type=int, default=None,
                   help="with --notebook/--sweep: runs stepped together per GPU (default: 4 on CUDA, 1 on CPU)")
    t.add_argument("--pack-mb", type=float, default=None, metavar="MIB",
                   help="with --notebook/--sweep: at most this many MiB of checkpoints in a pack (a run larger "
                        "alone is a pack of its own), so that a pack stopped part-way fits what a GPU call can "
                        "send back and carry into the next (.ci/gpu-session sets it)")
    t.add_argument("--group", action="store_true",
                   help="with --notebook/--sweep: train the seeds of one config as one grouped net (conv groups; "
                        "$RESNET_LAB_GROUP=1 does the same); off by default until the GPU bench shows it pays")
    t.add_argument("--skip", default=None, metavar="MANIFEST",
                   help="leave out the run(s) this manifest (`runs manifest` on another machine) has finished, so "
                        "that a fresh GPU machine trains only what is still missing")
    t.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop with a checkpoint after S seconds; the next call resumes")
    t.add_argument("--list", action="store_true", help="list the run(s) and their status, train nothing")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    an = sub.add_parser("analyse", help="compute and cache the stored runs' analyses a notebook reads (trains nothing)",
                        description="For each point of a --sweep grid (or a --notebook's parameters), compute the "
                                    "analyses of its finished runs and keep them in the run folders, where the "
                                    "notebook, `report` and `runs export` find them: 04's lesions, deletions and "
                                    "gradients take hours on a CPU and minutes on a GPU. Exit code 1 when some run has "
                                    "no finished model in this store (listed).")
    an.add_argument("--sweep", action="append", metavar="GRID", help="analyse this grid's points (repeatable)")
    an.add_argument("--notebook", action="append", metavar="STEM", help="analyse this notebook's runs (repeatable)")
    an.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                    help="with --notebook: a notebook parameter, JSON value, e.g. -p depth=56")
    an.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="default quick (a --sweep grid names its own)")
    an.add_argument("--device", default="auto",
                    help="auto | cpu | cuda | cuda:N (auto with --sweep: the grid's device, if it sets one)")
    an.set_defaults(func=cmd_analyse)

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
    r.add_argument("--force", action="store_true",
                   help="redraw a notebook even where a run its tables were drawn from is missing from the run "
                        "store, or is no longer drawn with these parameters (other seeds or depths, not finished, "
                        "no cached analysis); without it such a notebook is kept (a clone has no runs)")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="images/s of our loop vs the usual DataLoader loop, same process",
                       description="Writes results/bench/<device>.json and .md, and prints the table.")
    b.add_argument("--models", default="20,56", help="comma-separated depths (default 20,56)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    b.add_argument("--seconds", type=float, default=10.0, help="measuring time per loop and model")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--num-workers", type=int, default=4, help="baseline DataLoader workers")
    b.add_argument("--checkpointing", action="store_true",
                   help="also time activation checkpointing (2 segments, for GPUs under ~10 GiB) for nets "
                        "deeper than 200 layers")
    b.add_argument("--profile", action="store_true",
                   help="also profile 20 of our steps per model (3 for nets deeper than 200 layers), after every "
                        "timing: top ops and GPU-busy share (<device>-profile.txt)")
    b.add_argument("--fp16", action="store_true",
                   help="also time our step in fp16 with a dynamic loss scale (precision=fp16: cuDNN BatchNorm, "
                        "which bf16 never gets): fp16_img_s, fp16_gain over the bf16 step, fp16_skipped_steps")
    b.add_argument("--compile", action="store_true",
                   help="also time our step with each residual block through torch.compile (every net): "
                        "compiled_img_s, compile_gain over the graph step alone, compile_s for its first step")
    b.add_argument("--out", help="folder for <device>.json/.md (default: results/bench under the results folder)")
    b.add_argument("--tag", help="name the files <device>-<tag>.json/.md, keeping an earlier bench of the device")
    b.add_argument("--packs", default="auto", help="packed ResNet-20 run counts to time, e.g. 1,2,4,8 "
                   "(auto: 1,2,4,8 on CUDA, none on the CPU)")
    b.set_defaults(func=cmd_bench)

    rs = sub.add_parser("runs", help="move run folders between machines (export on the GPU, import here)")
    rsub = rs.add_subparsers(dest="runs_command", required=True)
    ex = rsub.add_parser("export", help="the run store as a gzipped tar in parts of at most --part-mb MiB")
    ex.add_argument("dest", help="folder for <name>.tar.gz.000, .001, ...")
    ex.add_argument("--checkpoints", action="store_true", help="include unfinished runs' checkpoints (to resume)")
    ex.add_argument("--part-mb", type=float, default=15.0)
    ex.add_argument("--name", default="runs")
    ex.add_argument("--skip", metavar="MANIFEST", help="leave out runs this manifest (`runs manifest` on the "
                    "receiving machine) has as far along")
    ex.add_argument("--max-mb", type=float, help="add runs only while the archive stays under this many MiB; "
                    "the rest waits for the next export (finished runs go first, but those the --skip manifest has with "
                    "their weights, sent again for new analyses, go last)")
    ex.add_argument("--unfinished", action="store_true", help="only runs not finished yet: with --checkpoints, what "
                    "a fresh machine needs to resume them (`train --skip MANIFEST` there leaves out the finished ones)")
    ex.add_argument("--to-analyse", metavar="GRID", action="append", help="only finished runs whose analyses "
                    "for this grid's points (04's) are not cached here, with their weights: for `resnet-lab analyse "
                    "--sweep GRID` on a GPU (minutes there, hours here); repeatable")
    ex.add_argument("--sent", metavar="LEDGER", help="this machine's record of its exports (created if missing): "
                    "runs it has as far along stay out, and this export's runs are added to it; for calls back to "
                    "back on one machine, whose --skip manifest is stale after the first")
    ex.set_defaults(func=cmd_runs_export)
    mf = rsub.add_parser("manifest", help="which runs this store has, how far along (JSON), for export --skip")
    mf.add_argument("out", nargs="?", help="file to write (default: stdout)")
    mf.set_defaults(func=cmd_runs_manifest)
    im = rsub.add_parser("import", help="merge exported parts, or a folder of run records (results/<preset>/runs); "
                         "the copy further along wins")
    im.add_argument("parts", nargs="+", help="every <name>.tar.gz.NNN of one export, or one folder of run records")
    im.set_defaults(func=cmd_runs_import)

    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .data import DataError
    from .train import ResultsWriteError

    try:
        try:
            args = build_parser().parse_args(argv)
            return args.func(args)
        except (DataError, ResultsWriteError) as e:  # no dataset, a damaged archive, a run store that cannot be
            raise SystemExit(f"error: {e}")  # written: the machine, not the input (exit 1), in one line
        except KeyboardInterrupt:  # Ctrl-C: quietly, with the shell's code (train and sweep say more)
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            sys.stdout.flush()  # a reader gone away (`| head`) shows here, not at exit as a traceback
    except BrokenPipeError:  # stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's own flush would fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
