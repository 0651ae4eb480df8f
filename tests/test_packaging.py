"""environment.yml and pyproject.toml name the same dependencies and bounds; the CLI answers --help."""
import os
import re
import shlex
import subprocess
import sys
import tomllib

import yaml

from .conftest import ROOT, needs_data, smoke_04_grid

CONDA_NAMES = {"pytorch": "torch", "ray-core": "ray"}  # conda-forge package name -> PyPI name


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def _bounds(reqs) -> dict[str, str]:
    """{name: the version specifier after it}, e.g. {"torch": ">=2.6"}."""
    return {CONDA_NAMES.get(_name(r), _name(r)): r.strip()[len(_name(r)):].strip() for r in reqs}


def test_environment_yml_matches_pyproject():
    """The same packages with the same lower bounds, and a Python that pyproject allows."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _bounds(py["dependencies"] + py["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = _bounds(d for d in env["dependencies"] if isinstance(d, str) and _name(d) not in ("python", "pip"))
    assert conda == want
    python = next(d for d in env["dependencies"] if isinstance(d, str) and _name(d) == "python")
    assert _version(python.split("=")[-1]) >= _version(py["requires-python"].removeprefix(">="))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.strip().split("."))


def test_the_code_parses_as_the_oldest_python_pyproject_allows():
    """requires-python is a promise: no syntax newer than it (PEP 695 `type`, say) may creep into the code."""
    import ast
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = _version(py["requires-python"].removeprefix(">="))
    files = sorted((ROOT / "resnet_lab").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 40
    for f in files:
        ast.parse(f.read_text(), filename=str(f), feature_version=oldest[:2])


def test_constraints_pin_every_dependency():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = {_name(r) for r in py["dependencies"]} | {_name(r) for r in py["optional-dependencies"]["dev"]}
    pinned = {_name(l) for l in (ROOT / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")}
    assert want <= pinned


def test_cli_help_and_bad_input():
    run = lambda *a: subprocess.run([sys.executable, "-m", "resnet_lab.cli", *a], capture_output=True, text=True)
    assert run("train", "--help").returncode == 0
    assert run("data", "info", "--help").returncode == 0
    r = run("train", "--depth", "21", "--preset", "smoke")
    assert r.returncode != 0 and "depth=21" in r.stderr and "6n+2" in r.stderr
    r = run("train", "--set", "lerning_rate=1")
    assert r.returncode != 0 and "lerning_rate" in r.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`resnet-lab ... | head`: when the reader has gone, exit with SIGPIPE's shell code 141 and no traceback."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # nobody will read: the first write fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "resnet_lab.cli", "sweep", str(ROOT / "sweeps" / "smoke_example.yaml"),
                            "--dry-run"], stdout=w_fd, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env={**os.environ, "RESNET_LAB_RESULTS": str(tmp_path), "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w_fd)
    assert r.returncode == 141 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@needs_data
def test_cli_trains_a_grids_runs_where_jupyter_is_missing(tmp_path):
    """`train --sweep` and `analyse --sweep` on the GPU machine, which has neither papermill nor Jupyter: both
    made unimportable."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor m in ('papermill', 'nbformat', 'nbclient', 'jupyter_client', 'ipykernel'):\n"
        "    sys.modules[m] = None\n")
    grid = tmp_path / "g.yaml"
    grid.write_text("notebook: 01_degradation\npreset: smoke\nparameters:\n  depths: [[8]]\n  seeds: [[0], [1]]\n")
    env = {**os.environ, "RESNET_LAB_RESULTS": str(tmp_path / "results"),
           "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "resnet_lab.cli", "train", "--sweep", str(grid), *a],
                                    capture_output=True, text=True, env=env)
    probe = subprocess.run([sys.executable, "-c", "import papermill"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0  # the block works
    r = run("--quiet", "--pack", "2")
    assert r.returncode == 0 and r.stdout.count(" done at step 6") == 4, r.stdout + r.stderr
    assert run("--list").stdout.count(" done ") == 4
    # then 04's analyses, as `resnet-lab analyse` computes them there after training
    smoke_04_grid(grid)
    assert run("--quiet").returncode == 0
    r = subprocess.run([sys.executable, "-m", "resnet_lab.cli", "analyse", "--sweep", str(grid)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "analysed 2 finished run(s): resnet-8, plain-8" in r.stdout, r.stdout + r.stderr
    assert len(list((tmp_path / "results" / "runs").glob("*/analysis-unravel-*.json"))) == 2


@needs_data
def test_cli_trains_a_notebooks_runs_without_jupyter(tmp_path):
    env = {**os.environ, "RESNET_LAB_RESULTS": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "resnet_lab.cli", "train", "--notebook", "01_degradation",
                                     "--preset", "smoke", "-p", "depths=[8]", *a], capture_output=True, text=True,
                                    env=env)
    r = run("--list")
    assert r.returncode == 0 and r.stdout.count("missing") == 2 and "plain-8" in r.stdout and "resnet-8" in r.stdout
    r = run("--quiet", "--pack", "2")
    assert r.returncode == 0 and r.stdout.count(" done at step 6") == 2 and "2 packed" in r.stdout, r.stderr
    assert run("--list").stdout.count(" done ") == 2
    r = run("--quiet", "--pack", "2", "--group", "-p", "seeds=[1,2]")  # two seeds of each net, grouped
    assert r.returncode == 0 and r.stdout.count("2 packed, grouped") == 4, r.stderr
    r = run("-p", "dephts=[8]")
    assert r.returncode != 0 and "dephts" in r.stderr and "depths" in r.stderr
    r = run("--depth", "20")
    assert r.returncode != 0 and "-p NAME=VALUE" in r.stderr


def test_make_reproduce_writes_each_notebooks_tables_into_the_committed_folder(monkeypatch):
    """A notebook run by hand writes into results/<preset>/scratch/; `make reproduce` must name the committed
    results/<preset>/<notebook>/ for every notebook it executes, or its tables would land in scratch."""
    make = (ROOT / "Makefile").read_text()
    lines = [ln for ln in make.splitlines() if "$(PAPERMILL) notebooks/" in ln]
    from resnet_lab.report import notebooks

    assert [re.search(r"notebooks/(\w+)\.ipynb", ln).group(1) for ln in lines] == notebooks()  # each, in order
    for ln in lines:
        nb = re.search(r"notebooks/(\w+)\.ipynb", ln).group(1)
        assert ln.strip().startswith(f'RESNET_LAB_OUTPUT_DIR="$(TABLES)/{nb}" '), ln
    out = subprocess.run(["make", "-s", "-f", "-", "show"], input=make + "\nshow:\n\t@echo $(TABLES)\n",
                         capture_output=True, text=True, cwd=ROOT,
                         env={**{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "PRESET")},
                              "RESNET_LAB_RESULTS": ""})  # under `make test PRESET=...` too
    assert out.stdout.strip() == f"{ROOT}/results/quick", out.stderr
    from resnet_lab.runs import results_dir

    monkeypatch.setenv("RESNET_LAB_RESULTS", "")  # empty: the project's folder, to make and to the package alike
    assert results_dir() == ROOT / "results"
    dry = subprocess.run(["make", "-n", "reproduce", "RESNET_LAB_RESULTS=/else where"], capture_output=True, text=True,
                         cwd=ROOT, env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")})
    papermill = [shlex.split(ln) for ln in dry.stdout.splitlines() if "papermill" in ln]
    assert [w[0] for w in papermill] == [f"RESNET_LAB_OUTPUT_DIR=/else where/quick/{nb}" for nb in notebooks()], \
        dry.stdout[-2000:]  # a folder with a space in its name stays one word
    assert [w[w.index("-k") + 5] for w in papermill] == [f"/else where/quick/executed/{nb}.ipynb" for nb in notebooks()]


def test_make_keeps_paths_with_spaces_whole(tmp_path):
    """A clone in "~/My Projects/" (or a relative RESNET_LAB_* with a space): make's abspath and wildcard split
    such a path at its spaces, which lost the shared dataset copy and named folders that do not exist."""
    top = tmp_path / "My Projects"
    (top / "shared" / "data").mkdir(parents=True)
    (top / "shared" / "data" / "cifar10-jpeg.tar.gz").write_bytes(b"")
    (top / "resnet-lab").mkdir()
    make = (ROOT / "Makefile").read_text() + "\nshow:\n\t@echo \"[$$RESNET_LAB_DATA][$$RESNET_LAB_RESULTS]\"\n"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "RESNET_LAB_DATA",
                                                            "RESNET_LAB_RESULTS")}
    show = lambda *a: subprocess.run(["make", "-s", "-f", "-", "show", *a], input=make, capture_output=True,  # noqa: E731
                                     text=True, cwd=top / "resnet-lab", env=env).stdout.strip()
    data = top / "shared" / "data" / "cifar10-jpeg.tar.gz"
    assert show() == f"[{data}][]"  # the copy beside the clone is found and named whole
    assert show("RESNET_LAB_RESULTS=my results") == f"[{data}][{top / 'resnet-lab' / 'my results'}]"
    assert show("RESNET_LAB_DATA=/abs dir/x.tar.gz") == "[/abs dir/x.tar.gz][]"


def test_make_gpu_in_passes_over_a_missing_or_empty_paper_records_folder(tmp_path):
    """`make gpu-in` imports results/paper/runs only where it holds something: a clone's missing or empty folder
    must not stop the session's preparation."""
    from .test_transfer import HASH, make_run

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    cli = f"{sys.executable} -m resnet_lab.cli"
    for records, imported in (("absent", False), ("empty", False), ("one", True)):
        results = tmp_path / records
        if records != "absent":
            (results / "paper" / "runs").mkdir(parents=True)
        if records == "one":
            make_run(results / "paper" / "runs", "aaa", "done", 100)
        dry = subprocess.run(["make", "-n", "gpu-in", f"RESNET_LAB_RESULTS={results}", "BIN=FAKEBIN"],
                             capture_output=True, text=True, cwd=ROOT, env=env)
        (line,) = [ln for ln in dry.stdout.splitlines() if "runs import" in ln]
        store = tmp_path / f"store-{records}"
        r = subprocess.run(["sh", "-c", line.replace("FAKEBIN/resnet-lab", cli)], capture_output=True, text=True,
                           env={**env, "RESNET_LAB_RESULTS": str(store), "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, (records, r.stderr)
        assert (store / "runs" / HASH["aaa"]).is_dir() == imported, records
