"""Sweeps: a YAML grid of papermill parameters for one notebook, executed point by point.

    notebook: 01_degradation        # stem (or path) of a notebook under notebooks/
    preset: smoke                   # a key of resnet_lab.config.PRESETS
    parameters:                     # name -> list of values; the cartesian product gives the points
      seeds: [[0], [1]]             # a list-valued parameter is a list of lists
      depths: [[8], [14]]
    fixed:                          # optional: passed unchanged to every point
      device: cpu
    report:                         # optional: the parameters `resnet-lab report` executes it with for this
      seeds: [0, 1]                 # preset, once the points' runs are stored (the combined table)

Each point is one papermill execution, in its own process, written to
`results/<preset>/executed/<notebook>-<point hash>.ipynb`. A point is done when the run store holds every
config the notebook trains for it (`experiments.configs_for` + `collect`) and its executed notebook
finished without an error; done points are skipped, so a sweep can be re-run after a crash or a
failure and only the missing work happens. A failed point keeps its output notebook (papermill's error
cell at the top is the log) and the others go on.

Backends: `local` runs points in child processes (`jobs` at a time, each pinned to its own share of the
CPU cores); `ray` sends the same executions to Ray tasks (`pip install 'resnet-lab[ray]'`).
"""
from __future__ import annotations

import argparse
import ast
import collections.abc
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, MutableMapping

if TYPE_CHECKING:
    import pandas as pd

    from .config import RunConfig

# Only the standard library at module level: a point's process loads this file on its own (see
# `_run_point_process`) and should spend its start-up on the kernel, not on torch or pandas.
log = logging.getLogger(__name__)

GRID_KEYS = ("notebook", "preset", "parameters", "fixed", "report")
BACKENDS = ("local", "ray")
RESULT_COLUMNS = ["point", "status", "seconds", "output", "error"]
DEFAULT_KERNEL = "resnet-lab"
# Thread-count variables a point's process (and its kernel) inherits. RESNET_LAB_THREADS is the project's
# own knob; the others cap OpenMP/MKL pools of libraries that read them at import.
THREAD_VARS = ("RESNET_LAB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# RESNET_LAB_* variables holding local paths (data.py, runs.py). Kernels start in notebooks/, so a relative
# value is made absolute against the caller's cwd before a point's process or a report's kernel sees it.
PATH_VARS = ("RESNET_LAB_DATA", "RESNET_LAB_DATA_DIR", "RESNET_LAB_RESULTS")
OUTPUT_VAR = "RESNET_LAB_OUTPUT_DIR"  # where a notebook writes its tables and figures (experiments.output_dir)
# the resnet_lab package a sweep or report runs from: a kernel importing another copy (another checkout's editable
# install, a relative PYTHONPATH that resolves elsewhere from notebooks/) would train that copy's code unnoticed
PACKAGE_VAR = "RESNET_LAB_PACKAGE"
STOP_GRACE_S = 10.0  # after Ctrl-C, how long running points get to shut their kernels down before SIGKILL
_RESULT_MARK = "@@resnet-lab-sweep-result@@ "
_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                       "list": (list, tuple), "tuple": (list, tuple), "dict": (dict,)}


def notebooks_dir() -> Path:
    """The project's notebooks/ folder (the grid's `notebook:` is looked up here)."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def sweeps_dir() -> Path:
    """The project's sweeps/ folder: its grids' `report:` sections are what `resnet-lab report` executes."""
    return Path(__file__).resolve().parent.parent / "sweeps"


# -- grids --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A validated sweep: which notebook, which preset, which parameter values."""

    notebook: str  # file stem, e.g. "01_degradation"
    notebook_path: Path
    preset: str
    parameters: dict[str, list[Any]] = field(default_factory=dict)  # the product of these gives the points
    fixed: dict[str, Any] = field(default_factory=dict)  # passed unchanged to every point
    source: Path | None = None  # the YAML file it came from
    report: dict[str, Any] = field(default_factory=dict)  # `resnet-lab report`'s parameters for this preset


@dataclass(frozen=True)
class Point:
    """One notebook execution of a sweep: its parameters, their hash, and where its output goes."""

    notebook: str
    notebook_path: Path
    params: dict[str, Any]  # everything papermill injects, preset included
    hash: str  # stable short hash of params: names the output notebook
    output: Path  # results/<preset>/executed/<notebook>-<hash>.ipynb
    label: str  # the grid's varied parameters, e.g. "seeds=[0] depths=[8]"


def params_hash(params: Mapping[str, Any]) -> str:
    """10 hex digits of the canonical JSON of the parameters: same values, same output file, any machine."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _type_name(v: Any) -> str:
    return type(v).__name__


def parameter_default(spec: Mapping[str, Any]) -> Any:
    """The notebook's default for a parameter as a Python value (`...` when it is not a literal)."""
    try:
        return ast.literal_eval(spec.get("default", ""))
    except (ValueError, SyntaxError):
        return ...


def _expected_types(spec: Mapping[str, Any]) -> tuple[tuple[type, ...], str] | None:
    """Python types a parameter accepts: those of its default in the notebook (None default: anything)."""
    default = parameter_default(spec)
    if default is None:
        return None
    name = type(default).__name__ if default is not ... else spec.get("inferred_type_name", "")
    types = _TYPES.get(name)
    return (types, name) if types else None


def _element_type(spec: Mapping[str, Any]) -> type | None:
    """The type of a list parameter's items, when its default is a non-empty list of one of int/str/bool."""
    default = parameter_default(spec)
    if not isinstance(default, (list, tuple)) or not default:
        return None
    kinds = {type(v) for v in default}
    return kinds.pop() if len(kinds) == 1 and kinds <= {int, str, bool} else None


def _as_int(value: Any) -> Any:
    """20.0 -> 20 (YAML and JSON write whole numbers either way; both must give the same point); else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_a(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _check_value(where: str, value: Any, spec: Mapping[str, Any]) -> Any:
    """The value, normalised (whole floats to int where the notebook's default is an int, also inside lists),
    or a ValueError: a value must have the type of the notebook's default, or papermill would inject nonsense."""
    expected = _expected_types(spec)
    if expected is None:
        return value
    types, name = expected
    if name == "int":
        value = _as_int(value)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        hint = ""
        if name in ("list", "tuple") and "parameters." in where and isinstance(value, (int, float)):
            hint = f"; a list-valued parameter is swept as a list of lists, e.g. [[{value!r}]]"
        elif name == "bool" and isinstance(value, str) and value.lower() in ("true", "false"):
            hint = (f"; papermill's -p makes only True and False bools: -p {spec['name']} {value.capitalize()}, "
                    f"or -y '{spec['name']}: {value.lower()}'")
        raise ValueError(f"{where}: value {value!r} is {_type_name(value)} but the notebook's {spec['name']} is "
                         f"{name} (default {spec.get('default')}){hint}")
    item = _element_type(spec) if name in ("list", "tuple") else None
    if item is None:
        return value
    items = [_as_int(v) for v in value] if item is int else list(value)
    for v in items:
        if not _is_a(v, item):
            raise ValueError(f"{where}: item {v!r} of {value!r} is {_type_name(v)} but the notebook's {spec['name']} "
                             f"holds {item.__name__} values (default {spec.get('default')})")
    return items


def _resolve_notebook(value: Any, where: str) -> Path:
    available = sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: notebook={value!r} is not valid: use one of {available}")
    stem = Path(value.strip()).name
    stem = stem[: -len(".ipynb")] if stem.endswith(".ipynb") else stem
    if stem not in available:
        raise ValueError(f"{where}: notebook {value!r} is unknown: use one of {available} (from {notebooks_dir()})")
    return notebooks_dir() / f"{stem}.ipynb"


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parameters cell as papermill's `inspect_notebook` describes it (name, default as source text,
    inferred_type_name), read with `ast`: grids are validated and trained (`train --sweep`) on the GPU
    machine too, which has no Jupyter."""
    path = Path(path)
    cells = [c for c in json.loads(path.read_text())["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} has {len(cells)} cells tagged 'parameters': expected exactly one")
    src = cells[0]["source"] if isinstance(cells[0]["source"], str) else "".join(cells[0]["source"])
    out: dict[str, dict[str, Any]] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value, kind = node.target.id, node.value, ast.get_source_segment(src, node.annotation)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value, kind = node.targets[0].id, node.value, "None"  # papermill's name for "not annotated"
        else:
            continue
        try:
            literal = ast.literal_eval(value)
            default, kind = repr(literal), type(literal).__name__
        except ValueError:  # not a literal: papermill keeps the source text; `parameter_default` then reads `...`
            default = ast.get_source_segment(src, value)
        out[name] = {"name": name, "default": default, "inferred_type_name": kind}
    return out


def grid_from_dict(raw: Any, where: str = "grid") -> Grid:
    """Validate a parsed grid (see `load_grid`); `where` names it in error messages."""
    from .config import PRESETS

    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with keys {list(GRID_KEYS)}, got {_type_name(raw)}")
    unknown = sorted(set(map(str, raw)) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}: allowed are {list(GRID_KEYS)}")
    if "notebook" not in raw:
        raise ValueError(f"{where}: missing key 'notebook': use one of "
                         f"{sorted(p.stem for p in notebooks_dir().glob('*.ipynb'))}")
    nb_path = _resolve_notebook(raw["notebook"], where)
    preset = raw.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:  # a list or a mapping is not hashable
        what = "missing key 'preset'" if "preset" not in raw else f"preset {preset!r} is unknown"
        raise ValueError(f"{where}: {what}: use one of {sorted(PRESETS)}")

    declared = notebook_parameters(nb_path)
    names = sorted(declared)
    sections: dict[str, dict[str, Any]] = {}
    for section in ("parameters", "fixed", "report"):
        got = raw.get(section)
        if got is None:
            got = {}
        if not isinstance(got, dict):
            raise ValueError(f"{where}: '{section}' must map parameter names to values, got {_type_name(got)}")
        for name in got:
            if name == "preset":
                raise ValueError(f"{where}: {section}.preset: set the preset with the top-level 'preset:' key "
                                 f"(one of {sorted(PRESETS)})")
            if name not in declared:
                raise ValueError(f"{where}: {section}.{name}: {nb_path.stem} declares no parameter {name!r}: "
                                 f"allowed are {[n for n in names if n != 'preset']}")
        sections[section] = dict(got)

    parameters, fixed = sections["parameters"], sections["fixed"]
    both = sorted(set(parameters) & set(fixed))
    if both:
        raise ValueError(f"{where}: {both} appear in both 'parameters' and 'fixed': keep each in one")
    for name, values in parameters.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: parameters.{name}={values!r} is not valid: give a non-empty list of "
                             f"values (one point per value)")
        seen: set[str] = set()
        checked = []
        for given in values:
            v = _check_value(f"{where}: parameters.{name}", given, declared[name])
            if isinstance(v, list) and not v:
                raise ValueError(f"{where}: parameters.{name} contains an empty list: give at least one value")
            key = json.dumps(v, sort_keys=True, default=str)
            if key in seen:
                same = f" ({given!r} is {v!r})" if repr(given) != repr(v) else ""  # [0.0] == [0] in Python
                raise ValueError(f"{where}: parameters.{name} lists {v!r} twice{same}: each value once")
            seen.add(key)
            checked.append(v)
        parameters[name] = checked
    for section in ("fixed", "report"):
        values = sections[section]
        for name, v in values.items():
            values[name] = v = _check_value(f"{where}: {section}.{name}", v, declared[name])
            if isinstance(v, list) and not v:
                raise ValueError(f"{where}: {section}.{name} is an empty list: give at least one value")
    if sections["report"]:  # `resnet-lab report` would find a bad value only inside the executed notebook
        try:
            _point_configs(nb_path.stem, {**sections["report"], "preset": preset})
        except ValueError as e:
            raise ValueError(f"{where}: report: {_one_line(e)}") from None
    return Grid(notebook=nb_path.stem, notebook_path=nb_path, preset=preset, parameters=parameters, fixed=fixed,
                report=sections["report"])


def _unique_keys_loader() -> type:
    """yaml's SafeLoader, but a mapping that names a key twice is an error (safe_load keeps the last one
    silently: `depths:` written twice would sweep only the second list)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges keys, and may override
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # SafeLoader says so itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {seen[key]}): keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid YAML before anything runs: every mistake is one ValueError line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"grid file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"grid file {str(path)!r} is a directory: give one YAML file in it, e.g. "
                         f"{sorted(str(p) for p in path.glob('*.yaml'))[:3] or 'sweeps/smoke_example.yaml'}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"grid file {str(path)!r} cannot be read ({_one_line(e)}): "
                         f"give a readable YAML file") from None
    try:
        raw = yaml.load(text, Loader=_unique_keys_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        detail = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else _one_line(e)
        raise ValueError(f"{path}: malformed YAML: {detail}") from None
    grid = grid_from_dict(raw, where=str(path))
    return dataclasses.replace(grid, source=path)


def params_label(params: Mapping[str, Any]) -> str:
    """`name=value ...` with JSON values: how a point (or a notebook's parameters) is named in output."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def expand(grid: Grid) -> list[Point]:
    """The grid's points in a fixed order (the cartesian product of the parameter lists)."""
    from .runs import results_dir

    out_dir = results_dir() / grid.preset / "executed"
    names = list(grid.parameters)
    points = []
    for combo in itertools.product(*(grid.parameters[n] for n in names)):
        varied = dict(zip(names, combo))
        params = {"preset": grid.preset, **grid.fixed, **varied}
        h = params_hash(params)
        label = params_label(varied) or h
        points.append(Point(grid.notebook, grid.notebook_path, params, h,
                            out_dir / f"{grid.notebook}-{h}.ipynb", label))
    return points


def report_parameters(preset: str, directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """notebook -> the `report:` section of its grid in sweeps/ for this preset: the combined execution over
    every point's runs (e.g. all seeds of Table 6), not one point's. Notebooks without one are left out."""
    found: dict[str, Grid] = {}
    for path in sorted((directory or sweeps_dir()).glob("*.yaml")):
        grid = load_grid(path)
        if grid.preset != preset or not grid.report:
            continue
        if grid.notebook in found:
            raise ValueError(f"{found[grid.notebook].source} and {path} both give report parameters for "
                             f"{grid.notebook} [{preset}]: keep one report: section per notebook and preset")
        found[grid.notebook] = grid
    return {name: dict(grid.report) for name, grid in found.items()}


def grid_configs(grid: Grid) -> list[RunConfig]:
    """Every RunConfig the grid's points train, each once, in point order: `train --sweep` trains them where
    there is no Jupyter (the GPU machine), and the sweep run here then finds its points' runs stored."""
    from .experiments import unique_runs

    return unique_runs(check_points(grid))


def device_missing(device: str) -> str | None:
    """Why this machine cannot give `device` (auto|cpu|cuda|cuda:N), or None where it can."""
    if not device.startswith("cuda"):
        return None
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(device.partition(":")[2] or 0) < n:
        return None
    return ("this machine has no CUDA device: use cpu or auto" if n == 0 else
            f"this machine has {n} CUDA device(s): use cuda:0 to cuda:{n - 1}")


def check_notebook(notebook: str, values: MutableMapping[str, Any]) -> None:
    """A notebook run directly (JupyterLab, papermill) checks its parameters as `resnet-lab sweep` checks a
    point's, before any training: each has the type of its default (papermill's `-p train_missing false`
    injects the string 'false', which is true), the counts their bounds, the device its format and, here,
    its presence (a run that cannot start is caught, and the notebook would end clean with empty tables).
    Whole floats of int parameters become ints in `values` (the notebook's globals), as a sweep injects them."""
    parent = os.environ.get(PACKAGE_VAR)
    if parent and Path(parent).resolve() != package_dir():
        raise RuntimeError(f"this kernel imported resnet_lab from {package_dir()}, but the sweep or report that "
                           f"started it runs {parent}: it would train and draw that other copy's code. Start it "
                           "from the checkout whose kernel this is, or give the kernel that checkout "
                           f"(PYTHONPATH={Path(parent).parent}, or that checkout's own `make install`)")
    declared = notebook_parameters(notebooks_dir() / f"{notebook}.ipynb")
    given = {name: _check_value(notebook, values[name], declared[name]) for name in declared if name in values}
    values.update(given)
    check_params(given)
    why = device_missing(given.get("device", "auto"))
    if why:
        raise ValueError(f"device={given['device']!r}: {why}")


def check_params(params: Mapping[str, Any]) -> None:
    """ValueError naming a value a notebook would take only to fail later: a device that is not
    auto|cpu|cuda|cuda:N, or a count (COUNT_PARAMS) that is not a positive integer within its bound."""
    from .config import check_device
    from .experiments import COUNT_PARAMS, check_count

    check_device(params.get("device", "auto"))
    for name in COUNT_PARAMS:
        if name in params:
            check_count(name, params[name])


def _point_configs(notebook: str, params: Mapping[str, Any]) -> list[RunConfig]:
    """The run configs a notebook's execution with these parameters trains, its parameters checked first
    (check_params); none for a notebook that trains nothing."""
    from .experiments import NOTEBOOK_CONFIGS, configs_for

    check_params(params)
    return configs_for(notebook, dict(params)) if notebook in NOTEBOOK_CONFIGS else []


def check_points(grid: Grid) -> list[RunConfig]:
    """Check every point's parameters and build its run configs, as `train --sweep` does, before anything runs:
    a value no config takes (depths [[7]], depth -8) then fails here, naming the point, not in the notebook.
    Returns every point's configs, in point order."""
    out: list[RunConfig] = []
    for point in expand(grid):
        try:
            out += _point_configs(point.notebook, point.params)
        except ValueError as e:
            raise ValueError(f"{grid.source or 'grid'}: point {point.label}: {_one_line(e)}") from None
    return out


# -- done-ness ----------------------------------------------------------------------------------------
def executed_ok(path: str | os.PathLike) -> bool:
    """True when papermill finished this output notebook and every code cell completed without error."""
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    pm = nb.get("metadata", {}).get("papermill", {})
    if pm.get("exception") is True or not pm.get("end_time"):
        return False
    # papermill marks never-started cells 'completed' when the kernel dies at start: start_time tells the truth
    cells = [c.get("metadata", {}).get("papermill", {}) for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    return all(c.get("status") == "completed" and c.get("start_time") for c in cells)


def _stored(point: Point) -> tuple[list, Any, list] | None:
    """(the runs the point's notebook needs, the store's rows of them, those not finished); None where the store
    cannot tell (a notebook `configs_for` does not know, parameters it rejects, no dataset to fingerprint)."""
    from .experiments import collect, configs_for

    try:
        cfgs = configs_for(point.notebook, point.params)
    except ValueError as e:
        log.info("%s %s: run store cannot tell (%s)", point.notebook, point.label, e)
        return None
    if not cfgs:
        return [], None, []
    try:
        runs, _, missing = collect(cfgs)
    except Exception as e:  # e.g. no dataset to fingerprint
        log.warning("%s %s: cannot read the run store (%s)", point.notebook, point.label, e)
        return None
    return cfgs, runs, missing


def is_done(point: Point) -> bool:
    """Done = the run store has every run the notebook trains for these parameters AND its notebook ran clean.

    Where the store cannot tell, the point is not done: running it is the only way to get its tables, and a
    bad value then fails there with the notebook's own message.
    """
    if not executed_ok(point.output):
        return False
    stored = _stored(point)
    return stored is not None and not stored[2]


def runs_left(point: Point) -> str | None:
    """None where the run store holds every run the point's notebook needs (or cannot tell: the clean
    execution stands); else what the notebook's top says of them. A notebook runs to its end when a run
    cannot start (no CUDA, out of memory): it draws what finished, so only the store tells."""
    from .experiments import store_status

    stored = _stored(point)
    if stored is None or not stored[2]:
        return None
    return f"the notebook ran to its end, but not every run it needs finished: {store_status(*stored)}"


# -- one point, in its own process ---------------------------------------------------------------------
def absolute_path_env(env: Mapping[str, str], cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """`env` with relative values of PATH_VARS, and relative entries of PYTHONPATH, made absolute against
    `cwd` (default: this process's cwd).

    A point's kernel (and a report's) runs in notebooks/: `RESNET_LAB_DATA=../shared/...` as the README
    suggests would resolve from there, a relative RESNET_LAB_RESULTS would give the kernel another
    store than the parent's, and `PYTHONPATH=.` another resnet_lab than the parent's (or none). Empty
    values and anything with a scheme (`s3://...`) pass unchanged.
    """
    out = dict(env)
    here = Path(cwd if cwd is not None else os.getcwd())

    def absolute(value: str) -> str:
        if not value or "://" in value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else here / path)

    for name in PATH_VARS:
        if out.get(name):
            out[name] = absolute(out[name])
    # an empty PYTHONPATH entry (`PYTHONPATH=$PYTHONPATH:/x` with none before) is the cwd, as Python reads it
    if out.get("PYTHONPATH"):
        out["PYTHONPATH"] = os.pathsep.join(absolute(v or ".") for v in out["PYTHONPATH"].split(os.pathsep))
    return out


def kernel_env() -> dict[str, str]:
    """What a point's or a report's kernel is given: RESNET_LAB_* and PYTHONPATH, their paths absolute, and
    PACKAGE_VAR naming this process's resnet_lab (`check_notebook` compares the kernel's with it)."""
    out = absolute_path_env({k: v for k, v in os.environ.items() if k.startswith("RESNET_LAB_") or k == "PYTHONPATH"})
    out[PACKAGE_VAR] = str(package_dir())
    return out


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set (what a kernel papermill starts inherits), restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_kernel(name: str) -> None:
    """ValueError unless `name` is a Jupyter kernel papermill finds here (looked up under `kernel_env`, as a
    point's or a report's papermill looks it up): a typo failed every notebook after it had started, with a
    traceback. No check without jupyter_client (the GPU machine executes no notebook)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        return
    with environ(kernel_env()):
        names = sorted(KernelSpecManager().find_kernel_specs())
    if name not in names:
        raise ValueError(f"--kernel {name!r} is not a Jupyter kernel here: use one of {names} "
                         f"(make install registers {DEFAULT_KERNEL})")


def package_dir() -> Path:
    """The folder of the resnet_lab package this process imported."""
    return Path(__file__).resolve().parent


def _point_spec(point: Point, kernel_name: str, threads: int) -> dict[str, Any]:
    env = kernel_env()
    env.update({k: str(threads) for k in THREAD_VARS})
    # the point's tables and figures beside its executed notebook: points of one notebook would otherwise all
    # write results/<preset>/<notebook>/ (at once, with --jobs), over the report's tables and each other's
    env[OUTPUT_VAR] = str(point.output.with_suffix("").absolute())
    return {"input": str(point.notebook_path), "output": str(point.output), "params": point.params,
            "kernel": kernel_name, "cwd": str(point.notebook_path.parent), "env": env}


def _cells_started(output: str) -> bool:
    try:
        nb = json.loads(Path(output).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(c.get("metadata", {}).get("papermill", {}).get("start_time") for c in nb.get("cells", []))


def _kernel_start_failure(e: BaseException) -> bool:
    """Errors a kernel start can raise (died before kernel_info, no reply in time, zmq), not bad input."""
    return isinstance(e, (RuntimeError, TimeoutError, ConnectionError)) or type(e).__module__.startswith("zmq")


def _execute_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the point's process: papermill once, again if the kernel never started."""
    import papermill as pm
    from jupyter_client.kernelspec import NoSuchKernel
    from papermill.exceptions import PapermillExecutionError

    Path(spec["output"]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            pm.execute_notebook(spec["input"], spec["output"], parameters=spec["params"],
                                kernel_name=spec["kernel"], cwd=spec["cwd"], progress_bar=False)
            return {"ok": True, "error": "", "attempts": attempt}
        except PapermillExecutionError as e:  # a cell raised: the output notebook holds the traceback
            return {"ok": False, "error": f"cell {e.exec_count}: {e.ename}: {_one_line(e.evalue)}",
                    "attempts": attempt}
        except NoSuchKernel:
            return {"ok": False, "attempts": attempt,
                    "error": f"kernel {spec['kernel']!r} not found: register it with `python -m ipykernel install "
                             f"--sys-prefix --name {spec['kernel']}` (make install does)"}
        except Exception as e:  # noqa: BLE001 - a kernel that never started is retried once, the rest reported
            msg = f"{type(e).__name__}: {_one_line(e)}"
            if attempt == 1 and _kernel_start_failure(e) and not _cells_started(spec["output"]):
                log.warning("kernel did not start for %s (%s): retrying once", spec["output"], msg)
                continue
            return {"ok": False, "error": msg, "attempts": attempt}
    raise AssertionError("unreachable")


def _die_with_parent(parent: int) -> None:
    """Linux: end this point's process when the sweep's ends, however it ends (`kill -9`, a lost session): in its
    own session nothing else reaches it, and it would train on unsupervised beside the next sweep's run of the
    same point. Its kernel then exits too (ipykernel polls its parent)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the sweep ended before the line above took effect
        os._exit(1)


def _child_main(spec_json: str, parent: int | None = None) -> int:
    """Entry point of a point's process: pin CPUs, execute, print one result line for the parent."""
    if parent is not None:
        _die_with_parent(parent)
    spec = json.loads(spec_json)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        try:  # the kernel inherits the pinning; train() sizes torch's thread pool from the affinity
            os.sched_setaffinity(0, spec["cpus"])
        except OSError as e:
            log.warning("cannot pin to cores %s (%s): running unpinned", spec["cpus"], e)
    result = _execute_in_child(spec)
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


class SweepStopped(RuntimeError):
    """A point was about to start after the sweep was told to stop (Ctrl-C)."""


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to a point's process group (its own session: the child and whatever it started there)."""
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix" and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Children:
    """The point processes of one sweep, so that Ctrl-C can stop them instead of waiting for them.

    new_session: start each child in its own session (local backend): a terminal's Ctrl-C then reaches the
    parent only, which stops the children itself (`stop`) and keeps queued points from starting.
    """

    def __init__(self, new_session: bool) -> None:
        self._new_session = new_session and os.name == "posix"
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopped = False

    def start(self, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        with self._lock:  # under the lock: `stop` sees every child that got started
            if self._stopped:
                raise SweepStopped("the sweep was interrupted before this point started")
            proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=self._new_session)
            self._procs.add(proc)
            return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """Start no more; SIGINT the running children (papermill shuts its kernel down), SIGKILL what is
        left after grace_s or at a second Ctrl-C. Returns how many were running."""
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        try:
            for proc in procs:
                _signal_group(proc, signal.SIGINT)
            deadline = time.monotonic() + grace_s
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
        return len(procs)


def _child_command(spec: dict[str, Any]) -> list[str]:
    """The command line of a point's process (loads this file without its package, runs `_child_main`)."""
    # `import resnet_lab` would import torch: seconds per point for nothing.
    boot = ("import importlib.util as u, sys; s = u.spec_from_file_location('_resnet_lab_sweep_point', sys.argv[1]); "
            "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); "
            "sys.exit(m._child_main(sys.argv[2], int(sys.argv[3])))")
    return [sys.executable, "-c", boot, str(Path(__file__).resolve()), json.dumps(spec), str(os.getpid())]


def _run_point_process(spec: dict[str, Any], children: _Children | None = None) -> dict[str, Any]:
    """Execute one point in a fresh Python process; whatever happens there, return a result dict.

    A separate process per point means a crashing kernel, a segfault or an OOM kill takes down that point
    only. Module-level so that Ray can ship it to its workers. children: the sweep's registry, which
    Ctrl-C stops (default: a private one, as on a Ray worker).
    """
    t0 = time.perf_counter()
    env = {**os.environ, **spec.get("env", {})}
    children = children if children is not None else _Children(new_session=False)
    proc = children.start(_child_command(spec), env)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:  # e.g. a Ray task cancelled: do not leave the point's process behind
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        children.forget(proc)
    result = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
            break
    if result is None:
        tail = _one_line(" ".join(stderr.strip().splitlines()[-3:])) or "no output"
        result = {"ok": False, "attempts": 1, "error": f"point process exited with code {proc.returncode}: {tail}"}
    result["seconds"] = time.perf_counter() - t0
    return result


# -- sweeps ---------------------------------------------------------------------------------------------
class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; `table` has the points that finished (the rest are 'interrupted').

    A KeyboardInterrupt, so code that does not know sweeps still stops as on any Ctrl-C.
    """

    def __init__(self, table: pd.DataFrame) -> None:
        finished = int(table["status"].isin(["done", "failed", "skipped"]).sum())
        super().__init__(f"sweep interrupted: {finished} of {len(table)} points finished; "
                         f"run it again to do the rest (done points are skipped)")
        self.table = table


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_slots(jobs: int) -> list[list[int] | None]:
    """Disjoint core sets, one per concurrent point, so that jobs * threads <= cores."""
    cores = _cores()
    if jobs <= 1 or not hasattr(os, "sched_setaffinity"):
        return [None] * max(1, jobs)
    if jobs > len(cores):
        log.warning("jobs=%d > %d cores: points share cores, one thread each", jobs, len(cores))
        return [[cores[i % len(cores)]] for i in range(jobs)]
    per = len(cores) // jobs
    return [cores[i * per:(i + 1) * per] for i in range(jobs)]


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken as Ctrl-C."""


def _terminate_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM (`kill`, `timeout`, a batch scheduler) and SIGHUP (a closed terminal) stop a sweep as Ctrl-C
    does, its points with it: they run in sessions of their own, which those signals never reach. A signal
    ignored (nohup) stays ignored. Returns the function that puts the old handlers back (a no-op outside the
    main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(signal.Signals(signum).name)

    sigs = [s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGHUP")) if s is not None]
    # one ignored stays ignored: `nohup resnet-lab sweep ...` must outlive its terminal
    old = {s: signal.signal(s, handler) for s in sigs if signal.getsignal(s) is not signal.SIG_IGN}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)
    return restore


def _run_local(todo: list[Point], jobs: int, kernel_name: str, on_result: Callable[[Point, dict], None]) -> None:
    """Points in child processes, `jobs` at a time. Ctrl-C (KeyboardInterrupt here, in the main thread), SIGTERM
    or SIGHUP cancels the queued points and stops the running ones, instead of waiting for all of them, then
    re-raises."""
    slots: queue.Queue = queue.Queue()
    for s in _cpu_slots(jobs):
        slots.put(s)
    threads = max(1, len(_cores()) // max(1, jobs))
    children = _Children(new_session=True)

    def task(point: Point) -> dict[str, Any]:
        cpus = slots.get()
        try:
            spec = _point_spec(point, kernel_name, len(cpus) if cpus else threads)
            spec["cpus"] = cpus
            return _run_point_process(spec, children)
        finally:
            slots.put(cpus)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep")
    restore = _terminate_as_interrupt()
    try:
        futures = {pool.submit(task, p): p for p in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    res = f.result()
                except Exception as e:  # noqa: BLE001 - could not even start the process
                    res = {"ok": False, "error": f"{type(e).__name__}: {_one_line(e)}", "seconds": 0.0}
                on_result(futures[f], res)
    except BaseException:  # Ctrl-C: the `with` form would wait here for every queued point
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("interrupted: cancelling the queued points and stopping the running ones "
                    "(up to %.0fs for their kernels to shut down; Ctrl-C again kills them now)", STOP_GRACE_S)
        children.stop(STOP_GRACE_S)
        raise
    finally:
        pool.shutdown(wait=True)  # after a stop: only threads whose child is already gone are left
        restore()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("backend='ray' needs Ray, an optional extra: pip install 'resnet-lab[ray]'") from e
    return ray


def _run_ray(todo: list[Point], jobs: int, kernel_name: str, address: str | None, gpus_per_task: float,
             on_result: Callable[[Point, dict], None]) -> None:
    ray = _import_ray()
    cores = len(_cores())
    threads = max(1, cores // max(1, jobs))
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=cores, include_dashboard=False)  # local: as many points at once as jobs allows
        else:
            ray.init(address=address)  # the cluster: its nodes need this checkout and a shared results dir
        started = True
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0)) if gpus_per_task else 0.0
        if gpus < gpus_per_task:  # Ray would queue every point for a GPU that never comes, without a word
            where = f"the Ray cluster at {address}" if address else "this machine's Ray"
            if address is None:
                raise ValueError(f"gpus_per_task={gpus_per_task:g}: {where} has {gpus:g} GPUs, so no point could "
                                 f"start; use --gpus-per-task 0 (points on the CPU) or a machine with a GPU")
            log.warning("gpus_per_task=%g: %s has %g GPUs now; points wait until a GPU node joins", gpus_per_task,
                        where, gpus)
        remote = ray.remote(_run_point_process).options(num_cpus=threads, num_gpus=gpus_per_task, max_retries=0)
        queue, refs, pending = list(todo), {}, []

        def submit() -> None:  # at most `jobs` points in flight: Ray's CPU count alone would allow more
            point = queue.pop(0)
            ref = remote.remote(_point_spec(point, kernel_name, threads))
            refs[ref] = point
            pending.append(ref)

        try:
            while queue and len(pending) < jobs:
                submit()
            while pending:
                ready, pending[:] = ray.wait(pending, num_returns=1)
                for r in ready:
                    try:
                        res = ray.get(r)
                    except Exception as e:  # noqa: BLE001 - a lost worker or node fails this point only
                        res = {"ok": False, "error": f"{type(e).__name__}: {_one_line(e)}"[:2000], "seconds": 0.0}
                    on_result(refs[r], res)
                    if queue:
                        submit()
        except KeyboardInterrupt:  # not force=True: the task's KeyboardInterrupt kills its point's process
            for r in pending:
                try:
                    ray.cancel(r)
                except Exception:  # noqa: BLE001 - best effort: the cluster may already be going away
                    pass
            raise
    finally:
        if started:
            ray.shutdown()


def run_sweep(grid: Grid, jobs: int = 1, backend: str = "local", dry_run: bool = False, address: str | None = None,
              gpus_per_task: float = 0.0, kernel_name: str = DEFAULT_KERNEL) -> pd.DataFrame:
    """Execute every point that is not done; one row per point: point, status, seconds, output, error.

    status: done (executed now), skipped (done before), failed (error kept in the output notebook; or its
    notebook ran clean but a run it needs did not finish: the error column says which), would-run (dry run).
    A failure never stops the other points. Ctrl-C does: queued points are cancelled, running ones stopped,
    and SweepInterrupted (a KeyboardInterrupt) carries the table, the rest 'interrupted'.
    jobs: points at once (on a Ray cluster too: across all its nodes); each point's process gets
    cores // jobs threads (locally: pinned to its own cores; with Ray: that many num_cpus per task, plus
    gpus_per_task of a GPU). address: a Ray cluster,
    whose nodes need this checkout at the same path and a shared results dir ($RESNET_LAB_RESULTS is passed on).
    kernel_name: the Jupyter kernel papermill starts (the project registers "resnet-lab"); one not found here is a
    ValueError before the first point starts.
    """
    from tqdm import tqdm  # text bars, as in train.py

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: use one of {list(BACKENDS)}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is not valid: use an integer >= 1")
    if not gpus_per_task >= 0:
        raise ValueError(f"gpus_per_task={gpus_per_task!r} is not valid: use a number >= 0 (e.g. 0.25)")
    if backend == "ray" and not dry_run:
        _import_ray()  # fail before anything else happens
    if backend == "local" and gpus_per_task:
        log.warning("gpus_per_task=%s applies to backend='ray' only; local points share the visible GPUs",
                    gpus_per_task)
    if backend == "local" and address:  # a cluster named, then run here: say so before the points start
        log.warning("address=%s applies to backend='ray' only: these points run on this machine", address)
    check_points(grid)  # a bad value fails now (exit 2), not in every point's notebook

    points = expand(grid)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Point] = []
    for p in points:
        if is_done(p):
            rows[p.hash] = {"status": "skipped", "seconds": 0.0, "error": ""}
        elif dry_run:
            rows[p.hash] = {"status": "would-run", "seconds": 0.0, "error": ""}
        else:
            todo.append(p)
    n_done = sum(r["status"] == "skipped" for r in rows.values())
    log.info("%s [%s]: %d points, %d done, %d to run%s", grid.notebook, grid.preset, len(points), n_done,
             len(points) - n_done, " (dry run: nothing executed)" if dry_run else "")

    if todo:
        check_kernel(kernel_name)  # before the first point starts: each would fail on it
        bar = tqdm(total=len(todo), desc=f"sweep {grid.notebook}", unit="point",
                   disable=bool(os.environ.get("CI")) or None)

        def on_result(point: Point, res: dict[str, Any]) -> None:
            left = runs_left(point) if res.get("ok") else None
            status = "done" if res.get("ok") and left is None else "failed"
            rows[point.hash] = {"status": status, "seconds": round(float(res.get("seconds", 0.0)), 2),
                                "error": left or res.get("error", "")}
            if res.get("attempts", 1) > 1:
                log.warning("%s %s: the kernel failed to start once and was retried", point.notebook, point.label)
            if status == "failed":
                log.error("%s %s failed: %s (notebook kept: %s)", point.notebook, point.label,
                          rows[point.hash]["error"], point.output)
            bar.update(1)

        try:
            if backend == "local":
                _run_local(todo, jobs, kernel_name, on_result)
            else:
                _run_ray(todo, jobs, kernel_name, address, gpus_per_task, on_result)
        except KeyboardInterrupt:
            for p in todo:  # queued, or stopped while running (not executed_ok); or finished, its result not
                # yet reported when the Ctrl-C came: its notebook says so
                rows.setdefault(p.hash, {"status": "done" if is_done(p) else "interrupted", "seconds": 0.0, "error": ""})
            raise SweepInterrupted(_table(points, rows)) from None
        finally:
            bar.close()
    return _table(points, rows)


def _table(points: list[Point], rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([{"point": p.label, **rows[p.hash], "output": str(p.output)} for p in points],
                        columns=RESULT_COLUMNS)


# -- command line ----------------------------------------------------------------------------------------
def _print_table(table: pd.DataFrame) -> None:
    import pandas as pd

    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(table.to_string(index=False))


def _cmd_sweep(a: argparse.Namespace) -> int:
    """`resnet-lab sweep`: print the table; the exit code is 1 when some point failed (the table says which),
    2 for a bad grid or option (one line, as argparse does), 130 after Ctrl-C (the table so far is printed)."""
    from .cli import EXIT_INCOMPLETE, usage_error

    try:
        grid = load_grid(a.grid)
        table = run_sweep(grid, jobs=a.jobs, backend=a.backend, dry_run=a.dry_run, address=a.address,
                          gpus_per_task=a.gpus_per_task, kernel_name=a.kernel)
    except ValueError as e:
        usage_error(e)
    except RuntimeError as e:  # the machine, not the input (e.g. Ray not installed)
        raise SystemExit(f"error: {e}")
    except SweepInterrupted as e:
        _print_table(e.table)
        print(f"error: {e}", file=sys.stderr)
        return 130
    _print_table(table)
    return EXIT_INCOMPLETE if (table["status"] == "failed").any() else 0


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sweep GRID.yaml [--jobs N] [--backend local|ray] [--dry-run] ...` to a CLI's subparsers."""
    s = subparsers.add_parser(
        "sweep", help="execute a notebook over a YAML grid of parameters (done points are skipped)",
        description="Execute one papermill notebook per grid point into results/<preset>/executed/. "
                    "Points whose runs are stored and whose notebook ran clean are skipped; a failed point keeps "
                    "its output notebook and the others go on. Exit code 1 when some point failed.")
    s.add_argument("grid", help="grid YAML (notebook, preset, parameters, fixed); see sweeps/")
    s.add_argument("--jobs", type=int, default=1, help="points at once; each gets cores/jobs threads (default 1)")
    s.add_argument("--backend", choices=BACKENDS, default="local", help="local process pool or a Ray cluster")
    s.add_argument("--dry-run", action="store_true", help="list the points and which are done; execute nothing")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    s.add_argument("--gpus-per-task", type=float, default=0.0, help="Ray GPU fraction per point, e.g. 0.25")
    s.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    s.set_defaults(func=_cmd_sweep)
    return s
