"""Guards a fifth mutation review found untested: each test fails against the code with that line changed
(report: the copy aside a killed report leaves and whose process counts as gone, what an unguarded or
interrupted execution leaves, the error line a failed notebook reports, when a notebook is kept, what
`stamp` records, and `report --force` and its exit code; sweep: SIGHUP, signal handlers off the main thread,
a point's process that outlives its sweep, the cores it is pinned to, a point whose process cannot start,
the rows an interrupt keeps, the exit code of a sweep of done points, children that ignore Ctrl-C and what
they started; transfer: which files an export removes and which runs and links it sends, duplicate names
and a cut gzip trailer, the mode of an imported folder, a run without a summary, leftovers of a run in
training, and a leftover behind the copy trained since)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest


# -- report: the copy aside, and what an execution leaves ---------------------------------------------------
DEAD = 2**22 + 7  # above any pid_max


def _report_env(tmp_path, monkeypatch, drawn=None):
    """A results root in tmp_path, and a run store that cannot tell which runs a notebook draws (no data)."""
    from resnet_lab import report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    monkeypatch.setattr(report, "_runs_drawn", lambda name, params: drawn)
    return report


def _build(report, **kw):
    return report.build("smoke", only=["01_degradation"], kernel="python3", **kw)


def test_the_copy_aside_a_killed_report_made_itself_is_put_back(tmp_path):
    """Its mark must name the executed notebook it guarded: a copy marked with anything else was dropped as one
    whose execution had finished, and the half-written tables of the killed execution stayed."""
    from resnet_lab import report

    executed = tmp_path / "executed" / "01_degradation.ipynb"
    executed.parent.mkdir()
    executed.write_text("{}")
    folder = tmp_path / "01_degradation"
    folder.mkdir()
    (folder / "table.csv").write_text("last good")
    backup = report._backup(folder, executed)
    os.replace(backup, backup.with_name(f".01_degradation.before-{DEAD}"))  # kill -9: its copy stays, its pid ends
    (folder / "table.csv").write_text("half-written")
    report._settle(folder, report._backup(folder, executed), ok=True)
    assert (folder / "table.csv").read_text() == "last good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_degradation", "executed"]


def test_another_users_report_counts_as_running(tmp_path, monkeypatch):
    """kill(pid, 0) on another user's process raises PermissionError: that report is alive, and its copy aside
    is neither put back over the folder nor removed."""
    from resnet_lab import report

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    executed = tmp_path / "executed" / "02_depth.ipynb"
    executed.parent.mkdir()
    executed.write_text("{}")
    folder, other = tmp_path / "02_depth", tmp_path / f".02_depth.before-{DEAD}"
    for d, text in ((folder, "new\n"), (other, "old\n")):
        d.mkdir()
        (d / "table.csv").write_text(text)
    (other / report.BACKUP_MARK).write_text(json.dumps({"executed": report._identity(executed)}))
    monkeypatch.setattr(os, "kill", denied)
    assert report._pid_alive(DEAD)
    backup = report._backup(folder, executed)
    assert (folder / "table.csv").read_text() == "new\n" and (other / "table.csv").read_text() == "old\n"
    report._settle(folder, backup, ok=True)


def test_a_failed_execution_that_could_not_be_guarded_leaves_its_tables(tmp_path, monkeypatch, caplog):
    """No copy aside (a full disk): the warning says the tables stay as the execution leaves them; a failure
    must not then delete the folder as if a copy were there to put back."""
    import shutil

    import papermill as pm

    report = _report_env(tmp_path, monkeypatch)
    tables = tmp_path / "smoke" / "01_degradation"
    tables.mkdir(parents=True)
    (tables / "table.csv").write_text("old")

    def fail(src, out, parameters, **kw):
        Path(out).write_text("{}")
        (tables / "table.csv").write_text("partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(pm, "execute_notebook", fail)
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert _build(report)["status"].tolist() == ["failed"] and "could not copy" in caplog.text
    assert (tables / "table.csv").read_text() == "partial"


def test_an_interrupted_execution_leaves_no_hidden_notebook(tmp_path, monkeypatch):
    """Ctrl-C mid-notebook: the hidden file papermill was writing goes (the test of the failed report only saw
    it replaced by a later execution of the same process)."""
    import papermill as pm

    report = _report_env(tmp_path, monkeypatch)

    def interrupted(src, out, parameters, **kw):
        Path(out).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pm, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(report)
    assert sorted(p.name for p in (tmp_path / "smoke" / "executed").iterdir()) == []


def test_a_failed_notebooks_row_gives_the_last_line_of_papermills_error(tmp_path, monkeypatch):
    """papermill's error starts with a rule and "Exception encountered at ..."; the exception is its last line."""
    import papermill as pm

    report = _report_env(tmp_path, monkeypatch)

    def fail(src, out, parameters, **kw):
        Path(out).write_text("{}")
        raise RuntimeError('\n' + '-' * 75 + '\nException encountered at "In [3]":\nTraceback (most recent call '
                           'last)\n  File "<cell>", line 1\nValueError: depth=9 is not 6n+2\n')

    monkeypatch.setattr(pm, "execute_notebook", fail)
    assert _build(report)["error"].tolist() == ["ValueError: depth=9 is not 6n+2"]


# -- report: when a notebook is kept, what stamp records, the command line --------------------------------
def _executed_with_record(path: Path, runs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": {"resnet_lab": {"runs": runs}}}))
    return path


def test_an_empty_tables_folder_has_nothing_to_keep(tmp_path):
    """A folder without tables holds nothing a redraw could lose: it is redrawn, not reported kept (exit 1)."""
    from resnet_lab import report

    executed = _executed_with_record(tmp_path / "executed" / "01_degradation.ipynb", ["a"])
    (tmp_path / "01_degradation").mkdir()
    assert report._lost_runs(executed, tmp_path / "01_degradation", ([], 1)) is None
    (tmp_path / "01_degradation" / "table.csv").write_text("run\n1\n")
    assert "not in it (a)" in report._lost_runs(executed, tmp_path / "01_degradation", ([], 1))


def test_only_04s_kept_message_sends_the_reader_to_resnet_lab_analyse(tmp_path, monkeypatch):
    """A stored run 04 no longer draws lacks its cached analysis: the message names the command that computes
    it; for the other notebooks that advice would be wrong."""
    from resnet_lab import report

    monkeypatch.setattr(report, "load_runs", lambda: pd.DataFrame({"hash": ["a"]}))
    for name, names_analyse in (("04_unraveled_ensemble", True), ("01_degradation", False)):
        executed = _executed_with_record(tmp_path / "executed" / f"{name}.ipynb", ["a"])
        (tmp_path / name).mkdir()
        (tmp_path / name / "table.csv").write_text("run\n1\n")
        why = report._lost_runs(executed, tmp_path / name, ([], 1))
        assert "stored but not drawn now (a:" in why and ("resnet-lab analyse" in why) == names_analyse, why


def test_stamp_records_each_executions_runs_from_its_own_parameters(tmp_path, monkeypatch):
    """`make reproduce` stamps every executed notebook: the runs are those its own parameters draw (not the
    defaults'), and a notebook that reads no runs (07) is passed over, not a crash of the whole stamp."""
    import nbformat

    from resnet_lab import report

    seen = {}

    def drawn(name, params):
        seen[name] = params
        return None if name == "07_imagenet_architectures" else (["h1", "h2"], 2)

    monkeypatch.setattr(report, "_runs_drawn", drawn)
    executed = tmp_path / "executed"
    executed.mkdir()
    for name, params in (("01_degradation", {"depths": [8]}), ("07_imagenet_architectures", {"repeats": 1})):
        nb = nbformat.v4.new_notebook()
        nb.metadata["papermill"] = {"parameters": params}
        nbformat.write(nb, executed / f"{name}.ipynb")
    report.stamp("smoke", executed)
    meta = lambda name: json.loads((executed / f"{name}.ipynb").read_text())["metadata"]  # noqa: E731
    assert seen["01_degradation"] == {"depths": [8], "preset": "smoke"}
    assert meta("01_degradation")[report.RECORD]["runs"] == ["h1", "h2"]
    assert report.RECORD not in meta("07_imagenet_architectures")


def test_report_force_reaches_the_build_and_a_kept_notebook_exits_1(tmp_path, monkeypatch, capsys):
    """`report --force` must redraw; without it a kept notebook (not redrawn) is not a clean report: exit 1."""
    from resnet_lab import cli, report

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path))
    forced = []

    def build(preset, only=None, kernel=None, force=False):
        forced.append(force)
        return pd.DataFrame([{"notebook": "01_degradation", "status": "done" if force else "kept", "seconds": 0.0,
                              "output": "", "error": ""}])

    monkeypatch.setattr(report, "build", build)
    assert cli.main(["report", "--preset", "smoke"]) == 1
    assert cli.main(["report", "--preset", "smoke", "--force"]) == 0
    assert forced == [False, True]


# -- sweep: signals, a point's process, the table --------------------------------------------------------
def test_sighup_stops_a_sweep_too_and_its_handler_is_put_back():
    """A closed terminal's SIGHUP never reaches the points (sessions of their own): it must stop the sweep as
    SIGTERM does, and the handler in place before comes back after."""
    from resnet_lab import sweep

    before = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        restore = sweep._terminate_as_interrupt()
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"):
            signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_sweep_run_outside_the_main_thread_sets_no_handler():
    """signal.signal raises ValueError outside the main thread: there the handlers are left alone, not a crash."""
    from resnet_lab import sweep

    got = []
    t = threading.Thread(target=lambda: got.append(sweep._terminate_as_interrupt()))
    t.start()
    t.join()
    assert len(got) == 1 and got[0]() is None


def _load_sweep_in_a_process(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with sweep.py loaded as `m`, as a point's process loads it."""
    from resnet_lab import sweep

    load = (f"import importlib.util as u, sys, json; s = u.spec_from_file_location('s', {str(Path(sweep.__file__))!r}); "
            "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); ")
    return subprocess.run([sys.executable, "-c", load + code, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_point_whose_sweep_ended_before_it_armed_its_death_signal_exits_at_once():
    """PR_SET_PDEATHSIG only covers a parent that dies after it is set: a point whose parent is already another
    process must end itself, or it trains on unsupervised."""
    p = _load_sweep_in_a_process("m._die_with_parent(int(sys.argv[1])); print('still running')", str(2**22 + 7))
    assert p.returncode == 1 and "still running" not in p.stdout


def test_a_points_process_arms_its_death_signal_and_pins_its_cores(monkeypatch, capsys):
    """`_child_main` is what a point's process runs: it must tie itself to the sweep's process (the pid
    `_child_command` passes) and pin itself to its share of cores before the kernel starts."""
    from resnet_lab import sweep

    calls = []
    monkeypatch.setattr(sweep, "_die_with_parent", lambda parent: calls.append(("parent", parent)))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: calls.append(("cpus", list(cpus))), raising=False)
    monkeypatch.setattr(sweep, "_execute_in_child", lambda spec: {"ok": True, "error": "", "attempts": 1})
    assert sweep._child_main(json.dumps({"cpus": [0]}), 4321) == 0
    assert calls == [("parent", 4321), ("cpus", [0])]
    assert capsys.readouterr().out.startswith(sweep._RESULT_MARK)
    assert sweep._child_command({})[-1] == str(os.getpid())


def _tiny_grid(tmp_path, xs):
    import nbformat

    from resnet_lab.sweep import Grid

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    return Grid(notebook="tiny", notebook_path=tmp_path / "tiny.ipynb", preset="smoke", parameters={"x": xs})


def test_a_point_whose_process_cannot_start_fails_alone(tmp_path, monkeypatch):
    """An OSError starting one point's process (no memory to fork, say) is that point's failure; the others run."""
    from resnet_lab import sweep

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "results"))

    def run_point(spec, children=None):
        if spec["params"]["x"] == 1:
            raise OSError(12, "Cannot allocate memory")
        return {"ok": True, "error": "", "attempts": 1, "seconds": 0.5}

    monkeypatch.setattr(sweep, "_run_point_process", run_point)
    table = sweep.run_sweep(_tiny_grid(tmp_path, [1, 2]), jobs=1, kernel_name="python3")
    assert table["status"].tolist() == ["failed", "done"] and "Cannot allocate memory" in table["error"][0]


def test_an_interrupt_keeps_the_rows_of_the_points_already_reported(tmp_path, monkeypatch):
    """A point that failed before the Ctrl-C is failed (and finished) in the table, not 'interrupted'."""
    from resnet_lab import sweep

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "results"))

    def run_local(todo, jobs, kernel, on_result):
        on_result(todo[0], {"ok": False, "error": "cell 3: ValueError: boom", "seconds": 1.0})
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_run_local", run_local)
    with pytest.raises(sweep.SweepInterrupted) as e:
        sweep.run_sweep(_tiny_grid(tmp_path, [1, 2, 3]), kernel_name="python3")
    assert e.value.table["status"].tolist() == ["failed", "interrupted", "interrupted"]
    assert "1 of 3 points finished" in str(e.value)


def test_a_sweep_whose_points_were_all_done_before_exits_0(tmp_path, monkeypatch):
    """Run again after it finished, every point is skipped: that is success, not exit 1."""
    import argparse

    from resnet_lab import sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text("notebook: 01_degradation\npreset: smoke\n")
    table = pd.DataFrame({"point": ["a", "b"], "status": ["skipped", "done"], "seconds": 0.0, "output": "",
                          "error": ""})
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: table)
    parser = argparse.ArgumentParser()
    sweep.add_sweep_parser(parser.add_subparsers())
    args = parser.parse_args(["sweep", str(grid)])
    assert args.func(args) == 0


def test_a_dry_run_says_which_points_are_done(tmp_path, monkeypatch):
    """--dry-run lists the done points as skipped, and only the others as would-run."""
    from resnet_lab import sweep

    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "results"))
    grid = _tiny_grid(tmp_path, [1, 2])
    done = sweep.expand(grid)[0].hash
    monkeypatch.setattr(sweep, "is_done", lambda p: p.hash == done)
    assert sweep.run_sweep(grid, dry_run=True)["status"].tolist() == ["skipped", "would-run"]


def test_a_point_the_store_cannot_judge_is_not_done(monkeypatch, tmp_path):
    """A clean notebook alone is not done where the store cannot tell (parameters it rejects, no dataset):
    the point runs again, and its own notebook says what is wrong."""
    from resnet_lab import sweep

    point = sweep.expand(_tiny_grid(tmp_path, [1]))[0]
    monkeypatch.setattr(sweep, "executed_ok", lambda path: True)
    monkeypatch.setattr(sweep, "_stored", lambda p: None)
    assert not sweep.is_done(point)
    monkeypatch.setattr(sweep, "_stored", lambda p: ([], None, []))
    assert sweep.is_done(point)


def test_a_stopped_sweep_starts_no_point_and_kills_one_that_ignores_ctrl_c():
    """After stop, no point may start; a point that ignores SIGINT is SIGKILLed once the grace is over."""
    from resnet_lab import sweep

    children = sweep._Children(new_session=True)
    proc = children.start([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                           "print('ready', flush=True); time.sleep(60)"], os.environ)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert children.stop(grace_s=0.5) == 1
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
    with pytest.raises(sweep.SweepStopped):
        children.start([sys.executable, "-c", "pass"], os.environ)


def test_stopping_a_point_stops_what_it_started_too():
    """Ctrl-C goes to the point's whole process group (its kernel with it), not to the point's process alone:
    a kernel left behind trains on unsupervised."""
    from resnet_lab import sweep

    children = sweep._Children(new_session=True)
    proc = children.start([sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, "
                           "'-c', 'import time; time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)"], os.environ)
    kernel = int(proc.stdout.readline())

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        children.stop(grace_s=5)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(kernel) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(kernel), "the point's kernel outlived it"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
        if alive(kernel):
            os.kill(kernel, signal.SIGKILL)


# -- transfer: what export removes, what import refuses or takes ------------------------------------------
def _transfer_run(root: Path, status: str | None = "done", steps: int = 6) -> Path:
    from resnet_lab.config import make_config

    cfg = make_config("smoke", seed=0)
    d = root / cfg.hash
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
    (d / "metrics.csv").write_text("step\n")
    if status is not None:
        (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": steps}))
    if status == "done":
        (d / "model.pt").write_bytes(b"weights")
    return d


def test_an_export_removes_only_numbered_parts_of_its_name(tmp_path):
    """A checksum or notes file beside the parts (`runs.tar.gz.sha256`) is the user's, not a stale part."""
    from resnet_lab.transfer import export_runs

    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.tar.gz.sha256").write_text("abc  runs.tar.gz.000\n")
    export_runs(out, root=_transfer_run(tmp_path / "gpu").parent)
    assert sorted(p.name for p in out.iterdir()) == ["runs.tar.gz.000", "runs.tar.gz.sha256"]


def _archive(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    part = tmp_path / "crafted.tar.gz.000"
    part.write_bytes(buf.getvalue())
    return part


def test_an_archive_naming_a_file_twice_is_refused(tmp_path):
    """tar keeps both copies of a name; taking the last silently would let a crafted archive pass one summary
    to the check and another to the store."""
    from resnet_lab.transfer import import_runs

    run = _transfer_run(tmp_path / "gpu", "running", 3)
    h, config = run.name, (run / "config.json").read_bytes()
    part = _archive(tmp_path, [(f"{h}/config.json", config), (f"{h}/summary.json", b'{"status": "running"}'),
                               (f"{h}/summary.json", b'{"status": "done"}')])
    with pytest.raises(ValueError, match="appears twice"):
        import_runs([part], root=tmp_path / "store")
    assert not (tmp_path / "store" / h).exists()


def test_a_part_without_its_gzip_trailer_is_refused_and_zero_padding_is_not(tmp_path):
    """gzip's last 8 bytes (CRC and length) are its only check of the whole: a part cut there decompresses in
    full and must still be refused. Zero padding after the stream is ignored, as gzip itself does."""
    from resnet_lab.transfer import export_runs, import_runs

    parts = export_runs(tmp_path / "out", root=_transfer_run(tmp_path / "gpu").parent)
    whole = parts[-1].read_bytes()
    parts[-1].write_bytes(whole[:-8])
    with pytest.raises(ValueError, match="not a complete, readable export"):
        import_runs(parts, root=tmp_path / "store")
    parts[-1].write_bytes(whole + b"\0" * 512)
    assert list(import_runs(parts, root=tmp_path / "store").values()) == ["imported"]


def test_an_imported_run_folder_honours_the_umask(tmp_path):
    """mkdtemp makes the staging folder 0700: a shared results folder's runs must stay readable to the group."""
    from resnet_lab.transfer import export_runs, import_runs

    parts = export_runs(tmp_path / "out", root=_transfer_run(tmp_path / "gpu").parent)
    old = os.umask(0o022)
    try:
        h = next(iter(import_runs(parts, root=tmp_path / "store")))
    finally:
        os.umask(old)
    assert (tmp_path / "store" / h).stat().st_mode & 0o777 == 0o755


def test_a_run_that_never_wrote_a_summary_is_imported_where_the_store_lacks_it(tmp_path):
    """Its progress ranks as nothing, as does a missing local copy: the store has no copy to keep."""
    from resnet_lab.transfer import export_runs, import_runs

    parts = export_runs(tmp_path / "out", root=_transfer_run(tmp_path / "gpu", status=None).parent)
    result = import_runs(parts, root=tmp_path / "store")
    assert list(result.values()) == ["imported"]
    assert (tmp_path / "store" / next(iter(result)) / "config.json").exists()


def test_leftovers_of_a_run_in_training_wait_and_the_import_goes_on(tmp_path):
    """An interrupted import's copies of a run a trainer holds are left for later: the import of other runs
    must not stop on that lock."""
    from resnet_lab.config import make_config
    from resnet_lab.runs import lock_run
    from resnet_lab.transfer import export_runs, import_runs

    store = tmp_path / "store"
    busy = _transfer_run(store, "running", 2)
    aside = store / f".{busy.name}.replaced-x"
    aside.mkdir()
    (aside / "config.json").write_bytes((busy / "config.json").read_bytes())
    other = make_config("smoke", seed=1)
    gpu = tmp_path / "gpu" / other.hash
    gpu.mkdir(parents=True)
    (gpu / "config.json").write_text(json.dumps({**other.to_json(), "hash": other.hash}))
    (gpu / "summary.json").write_text(json.dumps({"status": "running", "steps_done": 1}))
    parts = export_runs(tmp_path / "out", root=gpu.parent)
    with lock_run(busy):  # what a trainer holds while training (flock: per open file, this process's too)
        assert import_runs(parts, root=store) == {other.hash: "imported"}
    assert aside.exists()  # its own import (or the next) recovers it once the trainer is done


def _archive_names(parts) -> list[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        return sorted(t.getnames())


def test_an_export_sends_no_symlink_a_run_folder_or_an_analysis_name_could_be(tmp_path):
    """Only real run folders and regular analysis files travel: a link would ship whatever it points at
    (another store's run, any readable file) under a run's name."""
    from resnet_lab.transfer import export_runs

    elsewhere = _transfer_run(tmp_path / "elsewhere")
    (tmp_path / "secret.txt").write_text("not a run file")
    store = tmp_path / "store"
    store.mkdir()
    (store / elsewhere.name).symlink_to(elsewhere, target_is_directory=True)
    assert _archive_names(export_runs(tmp_path / "o1", root=store)) == []
    (store / elsewhere.name).unlink()
    run = _transfer_run(store)
    (run / "analysis-unravel-0123456789ab.json").symlink_to(tmp_path / "secret.txt")
    assert _archive_names(export_runs(tmp_path / "o2", root=store)) == [
        f"{run.name}/{n}" for n in ("config.json", "metrics.csv", "model.pt", "summary.json")]


def test_a_run_whose_config_names_another_run_stays_out_of_the_export(tmp_path, caplog):
    """Import refuses a whole archive with one such run: export leaves it out (and says so), so the rest travels."""
    from resnet_lab.config import make_config
    from resnet_lab.transfer import export_runs, import_runs

    store = tmp_path / "store"
    good = _transfer_run(store)
    wrong = store / make_config("smoke", seed=1).hash
    wrong.mkdir()
    (wrong / "config.json").write_bytes((good / "config.json").read_bytes())  # seed 0's config in seed 1's folder
    parts = export_runs(tmp_path / "out", root=store)
    assert "not exported" in caplog.text and wrong.name not in " ".join(_archive_names(parts))
    assert import_runs(parts, root=tmp_path / "here") == {good.name: "imported"}


def test_a_leftover_behind_the_copy_trained_since_is_dropped_not_put_back(tmp_path):
    """The folder was trained to the end after an import was killed: the old copy it left aside (step 2) is
    removed, never moved over the finished run."""
    from resnet_lab.transfer import _recover

    store = tmp_path / "store"
    store.mkdir()
    old = _transfer_run(tmp_path / "staging", "running", 2)
    os.replace(old, store / f".{old.name}.replaced-x")
    run = _transfer_run(store, "done", 6)
    _recover(store, run.name)
    assert json.loads((run / "summary.json").read_text()) == {"status": "done", "steps_done": 6}
    assert (run / "model.pt").exists() and not list(store.glob(".*"))
