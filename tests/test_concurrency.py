"""Two processes on one run store (a concurrency review): a notebook beside `resnet-lab analyse` computes an
analysis once, an import's folder swap keeps its lock, a process of the old code (its lock in the run folder)
still excludes this one, an export beside a trainer ships a curve that reaches its checkpoint and a run that
finished meanwhile as finished, a resume says when its curve falls short, a train after an import killed
mid-swap takes the copy it left, and figures are as readable as the tables beside them.

flock locks belong to an open file, not a process, so threads of one test contend as two processes would."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from resnet_lab import experiments as ex, transfer
from resnet_lab.config import make_config
from resnet_lab.models import model_from_config
from resnet_lab.runs import RunDir, RunLocked, lock_file, lock_run
from resnet_lab.transfer import export_runs, import_runs

from .test_transfer import HASH, make_run


def _finished(tmp_path) -> RunDir:
    cfg = make_config("smoke", depth=8)
    rd = RunDir(cfg, tmp_path)
    rd.path.mkdir(parents=True)
    torch.save(model_from_config(cfg).state_dict(), rd.model_file)
    return rd


def test_a_second_analysis_of_one_run_waits_for_the_first_and_reads_its_tables(tmp_path, caplog):
    """Both missed the cache and both computed (a ResNet-110's lesions: hours on a CPU each); now the second waits
    on the analysis's lock and reads what the first wrote."""
    rd, p = _finished(tmp_path), {"draws": 1}
    calls, started, release = [], threading.Event(), threading.Event()

    def slow(model):
        calls.append(1)
        started.set()
        release.wait(10)
        return {"t": pd.DataFrame({"a": [len(calls)]})}

    first = threading.Thread(target=ex._measure, args=(rd, "lesion", p, slow))
    first.start()
    assert started.wait(10)
    got = []
    second = threading.Thread(target=lambda: got.append(ex._measure(rd, "lesion", p, slow)))
    with caplog.at_level(logging.WARNING, logger="resnet_lab.runs"):
        second.start()
        time.sleep(0.3)
    assert second.is_alive()  # waiting for the first, not computing, and saying so (a notebook shows warnings)
    assert "another process is computing its lesion analysis: waiting for it" in caplog.text
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and got[0]["t"]["a"].tolist() == [1]
    # other settings are another analysis with its own lock: not held up by this one
    with rd.analysis_lock("lesion", p):
        assert ex._measure(rd, "lesion", {"draws": 2}, slow)["t"]["a"].tolist() == [2]


def test_an_analysis_in_a_store_it_cannot_lock_is_still_computed(tmp_path, monkeypatch):
    """A store this user may only read has no lock to take: the analysis is computed (and not cached), not refused."""
    rd = _finished(tmp_path)
    (tmp_path / ".locks").write_text("")  # in the way of the lock folder: mkdir fails with an OSError
    out = ex._measure(rd, "lesion", {"draws": 1}, lambda m: {"t": pd.DataFrame({"a": [7]})})
    assert out["t"]["a"].tolist() == [7]


def test_a_trainer_that_makes_the_folder_between_an_imports_renames_waits_for_it(tmp_path, monkeypatch):
    """The lock lived in the run folder: a trainer arriving between the import's two renames made the folder again,
    took a fresh lock nobody held and trained from step 0, and the import died on ENOTEMPTY."""
    store = tmp_path / "store"
    parts = export_runs(tmp_path / "out", root=make_run(tmp_path / "gpu", "aaa", "done", 6).parent)
    local = make_run(store, "aaa", "running", 2)
    real, seen = os.replace, []

    def replace(src, dst):
        real(src, dst)
        if str(src) == str(local) and not seen:  # the folder just moved aside: a trainer arrives now
            try:
                with lock_run(local, wait=False):
                    seen.append("took the lock")
            except RunLocked:
                seen.append("waits")

    monkeypatch.setattr(transfer.os, "replace", replace)
    assert import_runs(parts, root=store) == {HASH["aaa"]: "imported"}
    assert seen == ["waits"]
    assert json.loads((local / "summary.json").read_text())["status"] == "done"
    assert not [p for p in store.iterdir() if p.name.startswith(f".{HASH['aaa']}")]  # no copy left aside


def test_an_export_beside_a_trainer_ships_a_curve_that_reaches_its_checkpoint(tmp_path, monkeypatch):
    """The trainer writes metrics, then the checkpoint, then the summary; an export read the curve first, so an
    evaluation and checkpoint landing in between travelled as a checkpoint at step 20 beside a curve ending at 10,
    and the imported run finished with a gap."""
    gpu = tmp_path / "gpu"
    run = make_run(gpu, "bbb", "running", 10)
    (run / "metrics.csv").write_text("step\n10\n")
    (run / "checkpoint.pt").write_bytes(b"10")
    (run / "checkpoint.prev.pt").unlink()
    real, stepped = transfer._read, []

    def read(path):
        data = real(path)
        if path.name in ("metrics.csv", "checkpoint.pt") and not stepped:  # the trainer evaluates and saves now
            stepped.append(path.name)
            (run / "metrics.csv").write_text("step\n10\n20\n")
            (run / "checkpoint.pt").write_bytes(b"20")
        return data

    monkeypatch.setattr(transfer, "_read", read)
    export_runs(tmp_path / "out", root=gpu, checkpoints=True)
    here = tmp_path / "here"
    import_runs(sorted((tmp_path / "out").iterdir()), root=here)
    ckpt_step = int((here / HASH["bbb"] / "checkpoint.pt").read_bytes())
    assert max(pd.read_csv(here / HASH["bbb"] / "metrics.csv")["step"]) >= ckpt_step


@pytest.mark.usefixtures("cifar")
def test_a_resume_says_when_its_curve_lacks_evaluations_before_its_checkpoint(cifar, tmp_path, caplog):
    from resnet_lab.train import train

    from .test_train import tiny

    cfg = tiny()
    part = train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=4)
    rows = pd.read_csv(part.path / "metrics.csv")
    rows[rows["step"] != 2].to_csv(part.path / "metrics.csv", index=False)  # a curve copied apart from it
    with caplog.at_level(logging.WARNING, logger="resnet_lab.train"):
        train(cfg, root=tmp_path, data=cifar, device="cpu", stop_after=5)
    assert "lacks the evaluations at step 2 before its checkpoint (step 4)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="resnet_lab.train"):  # a whole curve: nothing to say
        train(tiny(seed=1), root=tmp_path, data=cifar, device="cpu", stop_after=4)
        train(tiny(seed=1), root=tmp_path, data=cifar, device="cpu", stop_after=5)
    assert "lacks" not in caplog.text


def test_a_figure_gets_the_mode_a_table_beside_it_gets(tmp_path):
    """Figures were written with mkstemp's 0600: other users of a shared results folder could read the tables
    but not the figures."""
    import matplotlib.pyplot as plt

    from resnet_lab import plots
    from resnet_lab.experiments import save_table

    old = os.umask(0o022)
    try:
        fig = plt.figure()
        paths = plots.save(fig, tmp_path, "f")
        plt.close(fig)
        table = save_table(pd.DataFrame({"a": [1]}), tmp_path, "t")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [*paths, table]}
    assert modes == {0o644} and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_lock_files_sit_beside_the_run_folders_and_are_no_run(tmp_path):
    """`.locks` is hidden: the store's listing, exports and `iter_runs` never take it for a run."""
    from resnet_lab.runs import iter_runs

    with lock_run(tmp_path / HASH["aaa"]):
        assert lock_file(tmp_path / HASH["aaa"]) == tmp_path / ".locks" / f"{HASH['aaa']}.lock"
    assert lock_file(tmp_path / HASH["aaa"]).exists() and not list(iter_runs(tmp_path))
    assert os.listdir(tmp_path / HASH["aaa"]) == [".lock"]  # the one the code before `.locks` takes


def test_a_process_waiting_for_a_run_says_so(tmp_path, caplog):
    """A second kernel training a run another kernel holds sat silent for the whole wait (hours for a paper
    run): it now says it waits, then goes on when the lock is free."""
    folder, done = tmp_path / HASH["aaa"], threading.Event()

    def take():
        with lock_run(folder):
            done.set()

    with lock_run(folder):
        with caplog.at_level(logging.WARNING, logger="resnet_lab.runs"):
            waiter = threading.Thread(target=take)
            waiter.start()
            time.sleep(0.3)
        assert not done.is_set()
        assert f"run {HASH['aaa']} is held by another process (a trainer or an import): waiting for it" in caplog.text
    waiter.join(10)
    assert done.is_set()


def test_a_process_of_the_old_code_and_this_one_exclude_each_other(tmp_path):
    """Versions before `.locks` locked `<run>/.lock` only: a kernel or sweep started before an update still does.
    Either side holding the run, the other must wait, not train it beside; and an import swapping the folder
    keeps that lock's file, as the old code did."""
    import fcntl

    def old_code_takes(folder):  # what lock_run did before `.locks`
        with open(folder / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

    folder = tmp_path / HASH["aaa"]
    folder.mkdir()
    with open(folder / ".lock", "w") as old:  # the old code's lock, held
        fcntl.flock(old, fcntl.LOCK_EX)
        with pytest.raises(RunLocked):
            with lock_run(folder, wait=False):
                pass
    fresh = tmp_path / HASH["bbb"]  # a folder this version made: no `.lock` until it locks
    with lock_run(fresh, wait=False):
        assert not old_code_takes(fresh)
    assert old_code_takes(fresh)

    store = tmp_path / "store"
    parts = export_runs(tmp_path / "out", root=make_run(tmp_path / "gpu", "ccc", "done", 6).parent)
    local = make_run(store, "ccc", "running", 2)
    inode = (local / ".lock").stat().st_ino
    assert import_runs(parts, root=store) == {HASH["ccc"]: "imported"}
    assert (local / ".lock").stat().st_ino == inode  # an old trainer waiting on it and a newcomer share it


def test_a_run_finishing_while_an_export_reads_it_travels_finished(tmp_path, monkeypatch):
    """Its summary read `running`, then it finished and dropped its checkpoints: it went as a run running without
    a checkpoint, which the other machine trained again from step 0."""
    gpu = tmp_path / "gpu"
    run = make_run(gpu, "bbb", "running", 5)
    real, finished = transfer._read, []

    def read(path):
        data = real(path)
        if path.name == "summary.json" and not finished:  # the trainer finishes now
            finished.append(1)
            (run / "model.pt").write_bytes(b"weights")
            (run / "summary.json").write_text(json.dumps({"status": "done", "steps_done": 8}))
            for name in ("checkpoint.pt", "checkpoint.prev.pt"):
                (run / name).unlink()
        return data

    monkeypatch.setattr(transfer, "_read", read)
    export_runs(tmp_path / "out", root=gpu, checkpoints=True)
    here = tmp_path / "here"
    import_runs(sorted((tmp_path / "out").iterdir()), root=here)
    assert json.loads((here / HASH["bbb"] / "summary.json").read_text())["status"] == "done"
    assert (here / HASH["bbb"] / "model.pt").read_bytes() == b"weights"


def test_a_recovery_moves_the_summary_after_everything_but_the_config(tmp_path, monkeypatch):
    """Files moved in set order (another in each process): a recovery killed after summary.json and before
    model.pt left a folder whose summary said done with no weights, which `train` took for finished."""
    store, h = tmp_path / "store", HASH["aaa"]
    store.mkdir()
    os.replace(make_run(tmp_path / "staging", "aaa", "done", 6), store / f".{h}.replaced-x")
    (store / h).mkdir()
    moved, real = [], os.replace
    monkeypatch.setattr(transfer.os, "replace", lambda src, dst: (moved.append(Path(dst).name), real(src, dst)))
    transfer._recover(store, h)
    assert moved[-2:] == ["summary.json", "config.json"] and "model.pt" in moved
    assert moved[:-2] == sorted(moved[:-2])  # the same order in every process


@pytest.mark.usefixtures("cifar")
def test_a_train_after_an_import_killed_mid_swap_takes_the_copy_it_left(cifar, tmp_path, caplog):
    """Killed between its two renames, an import leaves the run aside (`.<hash>.replaced-*`) and no folder: `train`
    read that as a run never trained and trained it again from step 0."""
    from resnet_lab.train import train, train_many

    from .test_train import tiny

    cfg = tiny()
    rec = train(cfg, root=tmp_path, data=cifar, device="cpu")
    before = {p.name: p.read_bytes() for p in rec.path.iterdir()}
    os.replace(rec.path, tmp_path / f".{rec.path.name}.replaced-x")
    with caplog.at_level(logging.WARNING, logger="resnet_lab.transfer"):
        again = train(cfg, root=tmp_path, data=cifar, device="cpu")
    assert "put back the copy an interrupted import left aside" in caplog.text
    assert {p.name: p.read_bytes() for p in again.path.iterdir()} == before  # not trained again
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", rec.path.name]
    shutil.rmtree(rec.path)  # the same through train_many's packs
    (tmp_path / f".{rec.path.name}.importing-y").mkdir()  # staging cut off part-way, no twin: never used
    (tmp_path / f".{rec.path.name}.importing-y" / "metrics.csv").write_text("step\n")
    whole = tmp_path / f".{rec.path.name}.replaced-z"
    whole.mkdir()
    for name, data in before.items():
        (whole / name).write_bytes(data)
    packed = train_many([cfg, tiny(seed=1)], root=tmp_path, data=cifar, device="cpu", pack=2)
    assert {p.name: p.read_bytes() for p in packed[0].path.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{rec.path.name}")]
    # a recovery killed part-way: the folder holds the copy's summary (done) and the mark naming it, not its
    # weights; the unlocked "finished?" glance must not return that as done
    for again in (lambda: train(cfg, root=tmp_path, data=cifar, device="cpu"),
                  lambda: train_many([cfg], root=tmp_path, data=cifar, device="cpu")[0]):
        os.replace(rec.path, tmp_path / f".{rec.path.name}.replaced-w")
        rec.path.mkdir()
        os.replace(tmp_path / f".{rec.path.name}.replaced-w" / "summary.json", rec.path / "summary.json")
        (rec.path / transfer.RECOVERING).write_text(f".{rec.path.name}.replaced-w")
        assert {p.name: p.read_bytes() for p in again().path.iterdir()} == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{rec.path.name}")]
