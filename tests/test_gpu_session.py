""".ci/gpu-session, the device call of a GPU session, end to end on the CPU: a mistake in it would cost device
time, which is scarce (15 minutes a session), so it is run here first with smoke-sized stages."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_lab import cli

from .conftest import smoke_04_grid

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu-session"


def _default(name: str) -> str:
    """A knob's default as the script sets it (`NAME=${NAME:-"..."}` or `${NAME-"..."}`)."""
    m = re.search(rf'^{name}=\$\{{{name}:?-"([^"]*)"\}}', SCRIPT.read_text(), re.M)
    assert m, f"{name} has no quoted default in {SCRIPT}"
    return m.group(1)


def test_the_defaults_are_commands_the_cli_takes():
    """The bench flags and the reference run the device call uses by default parse (a typo here would
    only show there); the grids it trains exist."""
    parser = cli.build_parser()
    parser.parse_args(["bench", *shlex.split(_default("BENCH_ARGS"))])
    parser.parse_args(["train", *shlex.split(_default("REFERENCE")), "--time-budget", "5"])
    for grid in _default("GRIDS").split():
        assert (ROOT / grid).is_file(), grid


def test_the_grids_sent_to_be_analysed_are_those_the_call_analyses():
    """`make gpu-in` carries the runs of its ANALYSE_GRIDS; a call analysing other grids would carry them for nothing."""
    m = re.search(r"^ANALYSE_GRIDS \?= (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m and m.group(1).split() == _default("ANALYSE_GRIDS").split()
    for grid in m.group(1).split():
        assert (ROOT / grid).is_file(), grid


def _session(tmp_path: Path, out: str, **env: str) -> subprocess.CompletedProcess:
    base = dict(os.environ, OUT=str(tmp_path / out), DEVICE="cpu", PY=sys.executable,
                GPU_IN=str(tmp_path / "in"), GPU_DIR=str(tmp_path / "gpu"), TESTS_RECORD=str(tmp_path / "record"),
                RESNET_LAB_RESULTS=str(tmp_path / "gpu" / "results"),  # the machine's own store, as there
                BUDGET_S="300", EXPORT_S="60", MIN_TRAIN_S="5", GRIDS="sweeps/smoke_example.yaml",
                REFERENCE="--preset smoke --depth 8 --set precision=fp32 --set fast=false")
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.usefixtures("cifar")  # it skips without a CIFAR-10 copy
def test_a_session_trains_what_is_missing_and_brings_back_only_what_is_new(tmp_path):
    """Call 1 imports the unfinished runs sent along, leaves out those the manifest has finished, trains the
    rest and exports them; call 2 on the same (warm) machine sends nothing twice; a bad stage is refused."""
    here = tmp_path / "here"
    env = dict(os.environ, RESNET_LAB_RESULTS=str(here))
    run = lambda *argv: subprocess.run([sys.executable, "-m", "resnet_lab.cli", *argv], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=300)
    done = run("train", "--preset", "smoke", "--depth", "8", "--device", "cpu", "--quiet")  # in 01's grid too
    assert done.returncode == 0, done.stderr
    (tmp_path / "in").mkdir()
    assert run("runs", "manifest", str(tmp_path / "in" / "have.json")).returncode == 0
    have = json.loads((tmp_path / "in" / "have.json").read_text())
    assert len(have) == 1

    first = _session(tmp_path, "out1", STAGES="import tests train export")
    log = (tmp_path / "out1" / "log.txt").read_text()
    assert first.returncode == 0, log
    assert "done; 0 stage(s) failed" in log and "resnet-8 seed 0: done in" in log  # not trained there
    assert re.search(r"\d+ skipped", log)  # the GPU tests ran (and skip without CUDA)
    assert re.search(r"== stack: python 3\.\d+\.\d+, torch \S+, .* pandas \d", log)  # the machine's own versions
    assert not list((tmp_path / "out1").glob("*-tests.json"))  # all skipped: no record of a pass
    parts = sorted(str(p) for p in (tmp_path / "out1").glob("runs.tar.gz.*"))
    assert parts and "8 run(s) in this export" in log  # the 7 other grid runs and the reference run
    imported = run("runs", "import", *parts)
    assert imported.returncode == 0, imported.stderr
    assert len([p for p in (here / "runs").iterdir() if not p.name.startswith(".")]) == 9  # .locks aside

    second = _session(tmp_path, "out2", STAGES="train export")
    log2 = (tmp_path / "out2" / "log.txt").read_text()
    assert second.returncode == 0, log2
    assert "0 run(s) in this export" in log2 and "earlier export from here sent them" in log2

    bad = _session(tmp_path, "out3", STAGES="tests bnech")
    assert bad.returncode == 2 and "unknown stage 'bnech'" in bad.stdout + bad.stderr


@pytest.mark.usefixtures("cifar")
def test_runs_sent_for_their_analyses_are_analysed_there_and_come_back_with_them(tmp_path):
    """What `make gpu-in` sends with --to-analyse (runs that finished in an earlier session's last minutes) is
    imported, analysed before any training and brought back; here the report then reads the analyses."""
    grid = smoke_04_grid(tmp_path / "g.yaml")
    here = tmp_path / "here"
    env = dict(os.environ, RESNET_LAB_RESULTS=str(here))
    run = lambda *argv: subprocess.run([sys.executable, "-m", "resnet_lab.cli", *argv], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=300)
    assert run("train", "--sweep", str(grid), "--device", "cpu", "--quiet").returncode == 0
    assert run("runs", "manifest", str(tmp_path / "in" / "have.json")).returncode == 0
    sent = run("runs", "export", str(tmp_path / "in"), "--name", "analyse", "--to-analyse", str(grid))
    assert sent.returncode == 0 and "2 run(s) in this export" in sent.stderr, sent.stderr

    call = _session(tmp_path, "out", STAGES="import analyse train export", GRIDS="", REFERENCE="",
                    ANALYSE_GRIDS=str(grid))
    log = (tmp_path / "out" / "log.txt").read_text()
    assert call.returncode == 0, log
    assert "import analyse: 1 part(s)" in log and "no " + str(tmp_path / "in") + "/resume.tar.gz.*" in log
    assert "analysed 2 finished run(s)" in log
    assert log.index("import analyse:") < log.index(f"analyse {grid} (at most") < log.index("export (max")
    assert "2 run(s) in this export" in log  # the same runs, now with their analyses
    assert "packs: 34 MiB, 1 less for the analyses" in log  # 36 - 1 for the tree, less what the records will grow
    back = run("runs", "import", *sorted(str(p) for p in (tmp_path / "out").glob("runs.tar.gz.*")))
    assert back.returncode == 0 and back.stdout.count("1 cached analysis file(s) added") == 2, back.stdout
    again = run("runs", "export", str(tmp_path / "in2"), "--name", "analyse", "--to-analyse", str(grid))
    assert "0 run(s) in this export" in again.stderr
    cut = _session(tmp_path, "out2", STAGES="analyse", ANALYSE_GRIDS=str(grid), ANALYSE_S="20", BUDGET_S="100")
    assert cut.returncode == 0 and "analyse: not run (20s left for it)" in (tmp_path / "out2" / "log.txt").read_text()
    # with training to follow, the analyses leave it MIN_TRAIN_S and STARTUP_S, as the bench does
    (tmp_path / "in" / "have.json").write_text("[]")  # not a manifest: the packs keep their size, and say why
    short = _session(tmp_path, "out4", STAGES="analyse train", ANALYSE_GRIDS=str(grid), BUDGET_S="200",
                     EXPORT_S="20", MIN_TRAIN_S="60", GRIDS="", REFERENCE="")
    log4 = (tmp_path / "out4" / "log.txt").read_text()
    m = re.search(r"analyse .* \(at most (\d+)s\)", log4)
    assert short.returncode == 0 and m and 95 <= int(m.group(1)) <= 105, log4  # 200 - 20 - 60 - 15, less the time gone
    assert "packs: 35 MiB; the analyses computed here were not measured (AttributeError" in log4
    bad = _session(tmp_path, "out3", STAGES="analyse", ANALYSE_S="2m")
    assert bad.returncode == 2 and "ANALYSE_S=2m is not valid" in bad.stdout + bad.stderr


def test_the_bench_leaves_the_training_its_minimum(tmp_path):
    """The first call's tests and bench must not eat the time its training was planned for: the bench is cut to
    what leaves MIN_TRAIN_S (and train's STARTUP_S), or skipped with a line saying so; the compile tests
    run last, in a process of their own."""
    fake = tmp_path / "py"  # python, but a bench that only says what it was given
    fake.write_text(f'#!/bin/bash\nif [ "$3" = bench ]; then echo "fake bench $*"; exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    common = dict(PY=str(fake), GRIDS="", REFERENCE="", EXPORT_S="20", MIN_TRAIN_S="60", BENCH_S="300")
    cut = _session(tmp_path, "o1", STAGES="bench train", BUDGET_S="200", **common)
    log = (tmp_path / "o1" / "log.txt").read_text()
    assert cut.returncode == 0, log
    m = re.search(r"bench .* \(at most (\d+)s\)", log)
    assert m and 95 <= int(m.group(1)) <= 105 and "fake bench" in log  # 200 - 20 - 60 - 15, less the seconds gone
    alone = _session(tmp_path, "o2", STAGES="bench", BUDGET_S="200", **common)
    log2 = (tmp_path / "o2" / "log.txt").read_text()
    m2 = re.search(r"bench .* \(at most (\d+)s\)", log2)  # 200 - 20, less the seconds gone (a slow start: 1 or 2)
    assert alone.returncode == 0 and m2 and 175 <= int(m2.group(1)) <= 180, log2
    none = _session(tmp_path, "o3", STAGES="bench train", BUDGET_S="120", **common)
    assert none.returncode == 0 and "bench: not run" in (tmp_path / "o3" / "log.txt").read_text()
    tests = _session(tmp_path, "o4", STAGES="tests", BUDGET_S="200", **common)
    log4 = (tmp_path / "o4" / "log.txt").read_text()
    assert tests.returncode == 0, log4
    assert log4.index("-k 'not compile'") < log4.index("tests/test_gpu.py -k compile")


def test_a_cold_later_call_imports_first_and_no_budget_outlasts_the_tools_limit(tmp_path):
    """s25 rehearsal: a `train export` call on a machine that went back found an empty store and trained every
    run from step 0 without a word; a BUDGET_S past 600 s was cut off by the tool before its export."""
    fake = tmp_path / "py"  # python, but resnet_lab.cli only says what it was given
    fake.write_text('#!/bin/bash\necho "fake cli ${*:3}"\n')
    fake.chmod(0o755)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "resume.tar.gz.000").write_bytes(b"")
    common = dict(PY=str(fake), GRIDS="sweeps/degradation.yaml", REFERENCE="", MIN_TRAIN_S="5")
    cold = _session(tmp_path, "o1", STAGES="train export", BUDGET_S="120", **common)
    log = (tmp_path / "o1" / "log.txt").read_text()
    assert cold.returncode == 0, log
    assert "COLD MACHINE" in log and log.index("fake cli runs import") < log.index("fake cli train")
    (tmp_path / "gpu" / "results" / "runs" / "0123456789ab").mkdir(parents=True)  # warm: a run in the store
    warm = _session(tmp_path, "o2", STAGES="train export", BUDGET_S="120", **common)
    log2 = (tmp_path / "o2" / "log.txt").read_text()
    assert warm.returncode == 0 and "COLD" not in log2 and "fake cli runs import" not in log2, log2
    assert "--pack-mb 35 " in log and "carry-mb (make gpu-in writes it): taking 36 MiB" in log
    (tmp_path / "in" / "carry-mb").write_text("36\n")  # what 64 MiB leaves beside the tree and the dataset
    sized = _session(tmp_path, "o5", STAGES="train", BUDGET_S="120", **{**common, "REFERENCE": "x"})
    assert sized.returncode == 0 and "--pack-mb 32 " in (tmp_path / "o5" / "log.txt").read_text()
    bad = _session(tmp_path, "o6", STAGES="train", BUDGET_S="120", PACK_MB="0", **common)
    assert bad.returncode == 2 and "PACK_MB=0 is not valid" in bad.stdout + bad.stderr
    bad = _session(tmp_path, "o7", STAGES="train", BUDGET_S="120", EXPORT_MB="lots", **common)
    assert bad.returncode == 2 and "EXPORT_MB=lots is not valid" in bad.stdout + bad.stderr
    (tmp_path / "in" / "carry-mb").write_text("036\r\n")  # written on another system: the same 36 MiB
    crlf = _session(tmp_path, "o8", STAGES="train", BUDGET_S="120", **common)
    assert crlf.returncode == 0 and "--pack-mb 35 " in (tmp_path / "o8" / "log.txt").read_text()
    for args, mb in (("--models 20", 60), ("--models 20 --profile", 45)):  # 8 files: 4 parts, or 3 beside 3
        benched = _session(tmp_path, "o10", STAGES="bench export", BUDGET_S="120", BENCH_ARGS=args, **common)
        assert benched.returncode == 0 and f"export (max {mb} MiB" in (tmp_path / "o10" / "log.txt").read_text()
    (tmp_path / "in" / "carry-mb").write_text("2\n")  # no room: one run a pack, the call still goes on
    tight = _session(tmp_path, "o9", STAGES="train", BUDGET_S="120", **common)
    assert tight.returncode == 0 and "--pack-mb 1 " in (tmp_path / "o9" / "log.txt").read_text()
    long = _session(tmp_path, "o3", STAGES="export", BUDGET_S="900", **common)
    assert long.returncode == 0 and "using 570" in (tmp_path / "o3" / "log.txt").read_text()
    octal = _session(tmp_path, "o4", STAGES="export", BUDGET_S="0540", **common)  # bash would read 352 s
    assert octal.returncode == 2 and "BUDGET_S=0540 is not valid" in octal.stdout + octal.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="1" tests="{n}">{cases}</testsuite></testsuites>"""


def _junit(path: Path, **outcomes: str) -> Path:
    """A pytest --junitxml file with the given test outcomes (passed, skipped, failed, error, timeout)."""
    tag = {"passed": "", "skipped": "<skipped message='no CIFAR-10 copy: set RESNET_LAB_DATA'/>",
           "failed": "<failure message='AssertionError: x'/>", "error": "<error message='x'/>",
           "timeout": "<failure message='Failed: Timeout (&gt;120.0s) from pytest-timeout.'/>"}
    cases = "".join(f'<testcase classname="tests.test_gpu" name="{k}" time="1">{tag[v]}</testcase>'
                    for k, v in outcomes.items())
    path.write_text(JUNIT.format(n=len(outcomes), cases=cases))
    return path


def _sources(root: Path) -> Path:
    for rel in ("resnet_lab/fast.py", "resnet_lab/sub/x.py", "tests/test_gpu.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    return root


def test_the_gpu_tests_outcomes_are_recorded_and_stand_until_a_source_torch_or_device_changes(tmp_path,
                                                                                               monkeypatch):
    from resnet_lab import gputests

    root = _sources(tmp_path / "tree")
    out = tmp_path / "out"
    out.mkdir()
    digest = gputests.source_digest(root)
    assert digest == gputests.source_digest(root) and len(digest) == 64
    for ignored in (".ipynb_checkpoints/fast-checkpoint.py", "__pycache__/x.py"):  # git-ignored: not on the GPU
        (root / "resnet_lab" / ignored).parent.mkdir(exist_ok=True)
        (root / "resnet_lab" / ignored).write_text("# not travelling\n")
    assert gputests.source_digest(root) == digest
    assert gputests.check(out, "cpu", root)[0] == gputests.RUN  # nothing recorded yet
    xml = lambda name, **o: _junit(tmp_path / f"{name}.xml", **o)  # noqa: E731
    # nothing final: no test, all skipped (no CUDA), one skipped (no data copy: it would stay untried), cut off
    for files in ([xml("none")], [xml("s", a="skipped", b="skipped")], [xml("s1", a="passed", b="skipped")],
                  [xml("t", a="passed"), xml("t2", b="timeout")]):
        assert gputests.record(out, files, "cpu", root) is None
        assert gputests.not_final(gputests.summarise(files))
    assert "cut off by pytest-timeout: b" == gputests.not_final(gputests.summarise([xml("t2", b="timeout")]))
    assert not list(out.iterdir())

    path = gputests.record(out, [xml("p", a="passed", b="passed"), xml("c", c="passed")], "cpu", root)
    assert path is not None and path.name.endswith("-tests.json") and path.name.startswith("cpu-")
    rec = json.loads(path.read_text())
    assert (rec["passed"], rec["skipped"], rec["failed"]) == (3, 0, 0) and rec["digest"] == digest
    assert rec["tests"]["tests.test_gpu::b"] == "passed"
    code, why = gputests.check(out, "cpu", root)
    assert code == gputests.PASSED and "3 passed, 0 skipped, 0 failed on cpu" in why
    assert any("these sources: a call there" in line for line in gputests.status(out, root))

    # a failure is recorded too (rerunning unchanged code in the next session would tell nothing new), by name
    gputests.record(out, [xml("f", a="passed", b="failed"), xml("e", c="error", d="passed")], "cpu", root)
    code, why = gputests.check(out, "cpu", root)
    assert code == gputests.FAILED and "2 passed, 0 skipped, 2 failed (b, c)" in why

    (root / "resnet_lab" / "sub" / "x.py").write_text("# changed\n")  # a package file, however deep
    code, why = gputests.check(out, "cpu", root)
    assert code == gputests.RUN and "the sources changed" in why
    assert any("the sources changed since" in line for line in gputests.status(out, root))
    (root / "resnet_lab" / "sub" / "x.py").write_text("# resnet_lab/sub/x.py\n")
    assert gputests.check(out, "cpu", root)[0] == gputests.FAILED
    (root / "tests" / "test_other.py").write_text("# not a GPU test\n")  # the CPU suite is not what they check
    assert gputests.check(out, "cpu", root)[0] == gputests.FAILED
    (root / "tests" / "test_gpu.py").write_text("# changed\n")
    assert gputests.check(out, "cpu", root)[0] == gputests.RUN
    (root / "tests" / "test_gpu.py").write_text("# tests/test_gpu.py\n")

    monkeypatch.setattr(gputests.torch, "__version__", "9.9.9")
    code, why = gputests.check(out, "cpu", root)
    assert code == gputests.RUN and "torch" in why and "9.9.9" in why
    monkeypatch.undo()
    assert gputests.check(out, "cpu", root)[0] == gputests.FAILED
    path.write_text("[]")
    assert "not a record" in gputests.check(out, "cpu", root)[1]
    path.write_text("{")
    assert "unreadable" in gputests.check(out, "cpu", root)[1] and "unreadable" in gputests.status(out, root)[0]
    assert gputests.status(tmp_path / "nothing", root)[0].startswith("no record")
    with pytest.raises(FileNotFoundError, match="none of"):
        gputests.source_digest(tmp_path / "empty")


def test_a_later_call_skips_the_gpu_tests_that_ran_on_these_sources(tmp_path):
    """The first call records the GPU tests' outcomes with its files; a call whose tree has that record
    (committed from results/bench) does not spend 4 of the session's 15 minutes running them again, unless
    asked, and still fails where they failed; a call whose tests were cut off records nothing."""
    fake = tmp_path / "py"  # python, but pytest writes a junit file (the GPU tests only skip here): FAIL=1 fails
    fake.write_text(f"""#!/bin/bash
if [ "$2" = pytest ]; then
  for ((i = 1; i <= $#; i++)); do [ "${{!i}}" = --junitxml ] && j=$((i + 1)) && xml=${{!j}}; done
  echo "fake pytest $* (PYTEST_ADDOPTS=${{PYTEST_ADDOPTS-unset}})"
  [ -n "$HANG" ] && exec sleep 60
  f=""; [ -n "$FAIL" ] && f="<failure message='x'/>"
  printf '<testsuites><testsuite><testcase classname="t" name="t%s">%s</testcase></testsuite></testsuites>' \\
    "$RANDOM" "$f" > "$xml"
  [ -n "$FAIL" ] && exit 1
  exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    common = dict(PY=str(fake), GRIDS="", REFERENCE="", STAGES="tests", BUDGET_S="200")
    first = _session(tmp_path, "o1", TESTS_RECORD=str(tmp_path / "none"), PYTEST_ADDOPTS="-x", **common)
    log = (tmp_path / "o1" / "log.txt").read_text()
    assert first.returncode == 0, log
    assert "GPU tests to run: no record" in log and log.count("fake pytest") == 2
    assert log.count("PYTEST_ADDOPTS=unset") == 2  # a -x there would leave a partial junit file
    recs = list((tmp_path / "o1").glob("*-tests.json"))
    assert len(recs) == 1 and json.loads(recs[0].read_text())["passed"] == 2, log

    again = _session(tmp_path, "o2", TESTS_RECORD=str(tmp_path / "o1"), **common)
    log2 = (tmp_path / "o2" / "log.txt").read_text()
    assert again.returncode == 0, log2
    assert "ran here already: 2 passed" in log2 and "tests: not run" in log2 and "fake pytest" not in log2
    forced = _session(tmp_path, "o3", TESTS_RECORD=str(tmp_path / "o1"), TESTS_AGAIN="1", **common)
    assert forced.returncode == 0 and (tmp_path / "o3" / "log.txt").read_text().count("fake pytest") == 2

    failing = _session(tmp_path, "o4", TESTS_RECORD=str(tmp_path / "none"), FAIL="1", **common)
    log4 = (tmp_path / "o4" / "log.txt").read_text()
    assert failing.returncode == 1 and "tests exited 1" in log4  # the call says it failed, and records it
    assert json.loads(next((tmp_path / "o4").glob("*-tests.json")).read_text())["failed"] == 2
    skipped = _session(tmp_path, "o5", TESTS_RECORD=str(tmp_path / "o4"), **common)
    log5 = (tmp_path / "o5" / "log.txt").read_text()
    assert skipped.returncode == 1 and "fake pytest" not in log5  # not run again, but still a failed call
    assert "2 failed (t" in log5 and "1 stage(s) failed: tests (recorded failures" in log5
    cut = _session(tmp_path, "o6", TESTS_RECORD=str(tmp_path / "none"), HANG="1", TESTS_S="3", **common)
    log6 = (tmp_path / "o6" / "log.txt").read_text()
    assert cut.returncode == 1 and "tests exited 124" in log6, log6
    assert not list((tmp_path / "o6").glob("*-tests.json"))  # cut off: not a record of what the tests say
