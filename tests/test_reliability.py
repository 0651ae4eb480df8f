"""Kill -9 and resume, damaged checkpoints, concurrent requests, write failures."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from resnet_lab import runs as R
from resnet_lab.config import make_config
from resnet_lab.train import ResultsWriteError, train

from .conftest import ROOT, needs_data

pytestmark = needs_data
COLS = ["step", "lr", "train_loss", "train_err", "test_loss", "test_err"]


def cfg(**kw):
    base = dict(arch="resnet", depth=8, iterations=12, eval_every=2, batch_size=16, train_subset=256,
                eval_subset=64, milestones=(8,))
    base.update(kw)
    return make_config("smoke", **base)


CHILD = """
import sys, json
from resnet_lab.config import RunConfig
from resnet_lab.train import train
c = RunConfig.from_json(json.loads(sys.argv[1]))
rec = train(c, root=sys.argv[2], device="cpu", progress=False, checkpoint_every_s=0)
print("PID", rec.summary["pid"])
"""


def _child(c, root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(c.to_json()), str(root)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(cifar, tmp_path):
    c = cfg(iterations=400, eval_every=4, milestones=(300,), dataset=cifar.info.sha256[:16])
    p = _child(c, tmp_path / "killed")
    run = tmp_path / "killed" / c.hash
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it get further, maybe into a checkpoint write
    assert p.poll() is None, "finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close(), p.stderr.close()
    killed = json.loads((run / "summary.json").read_text())
    assert killed["status"] == "running" and not (run / "model.pt").exists()
    # the summary is the newest checkpoint's progress (what manifests, exports and --list read), not the start's
    import torch

    newest = run / "checkpoint.pt" if (run / "checkpoint.pt").exists() else run / "checkpoint.prev.pt"
    ckpt_step, at = int(torch.load(newest, weights_only=True)["step"]), killed["steps_done"]
    assert at in (ckpt_step, ckpt_step - 4) and at > 0  # - 4: killed between a checkpoint and its summary
    assert killed["sittings"][-1]["to_step"] == at
    assert killed["final_test_err"] == pd.read_csv(run / "metrics.csv").set_index("step")["test_err"][at]
    rd = R.RunDir(c, tmp_path / "killed")
    assert rd.live_status() == "stopped"  # what `train --list` shows: nobody holds it, it resumes when asked
    with R.lock_run(run):
        assert rd.live_status() == "running"
    resumed = train(c, root=tmp_path / "killed", data=cifar, device="cpu")
    straight = train(c, root=tmp_path / "straight", data=cifar, device="cpu")
    assert resumed.status == "done" and len(resumed.metrics) == 100
    pd.testing.assert_frame_equal(resumed.metrics[COLS], straight.metrics[COLS], check_exact=True)


def test_truncated_checkpoint_is_set_aside_and_the_previous_one_used(cifar, tmp_path, caplog):
    c = cfg()
    train(c, root=tmp_path, data=cifar, device="cpu", stop_after=3)
    part = train(c, root=tmp_path, data=cifar, device="cpu", stop_after=6)  # now checkpoint.prev.pt exists too
    ck = part.path / "checkpoint.pt"
    assert (part.path / "checkpoint.prev.pt").exists()
    ck.write_bytes(ck.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        done = train(c, root=tmp_path, data=cifar, device="cpu")
    assert "failed to load" in caplog.text and list(part.path.glob("checkpoint.pt.bad-*"))
    straight = train(c, root=tmp_path / "b", data=cifar, device="cpu")
    pd.testing.assert_frame_equal(done.metrics[COLS], straight.metrics[COLS], check_exact=True)


def test_a_checkpoint_with_a_bad_training_state_is_set_aside_and_its_leftovers_removed(cifar, tmp_path, caplog):
    """A readable checkpoint whose RNG state or counters are wrong (not only its weights) is set aside like a
    truncated one, instead of failing every later call; a temp file of a save cut short by a kill goes."""
    import torch

    c = cfg()
    train(c, root=tmp_path, data=cifar, device="cpu", stop_after=3)
    part = train(c, root=tmp_path, data=cifar, device="cpu", stop_after=6)
    ck = part.path / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["torch_rng"], state["accumulators"]["seen"] = torch.zeros(4, dtype=torch.uint8), "many"
    torch.save(state, ck)
    leftover = part.path / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    with caplog.at_level("WARNING"):
        done = train(c, root=tmp_path, data=cifar, device="cpu")
    assert done.status == "done" and "torch_rng, accumulators are not" in caplog.text
    assert list(part.path.glob("checkpoint.pt.bad-*")) and not leftover.exists()
    straight = train(c, root=tmp_path / "b", data=cifar, device="cpu")  # resumed from the previous checkpoint
    pd.testing.assert_frame_equal(done.metrics[COLS], straight.metrics[COLS], check_exact=True)


def test_concurrent_requests_train_once(cifar, tmp_path):
    c = cfg(iterations=40, dataset=cifar.info.sha256[:16])
    a, b = _child(c, tmp_path), _child(c, tmp_path)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    pids = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("PID")}
    assert len(pids) == 1, f"trained by {pids}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", c.hash]  # one run folder, beside its lock


def test_disk_full_is_a_clear_error_and_finished_runs_stay_intact(cifar, tmp_path, monkeypatch):
    done = train(cfg(iterations=2), root=tmp_path, data=cifar, device="cpu")
    before = {p.name: p.read_bytes() for p in done.path.iterdir() if p.is_file()}
    real = R._atomic_write

    def full(path, write):
        if path.name == "metrics.csv":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(R, "_atomic_write", full)
    with pytest.raises(ResultsWriteError, match="No space left on device"):
        train(cfg(iterations=4, seed=1), root=tmp_path, data=cifar, device="cpu")
    assert {p.name: p.read_bytes() for p in done.path.iterdir() if p.is_file()} == before


def test_a_checkpoint_saved_channels_last_resumes_exactly(cifar, tmp_path):
    """A CUDA checkpoint holds channels_last momentum; resumed on the CPU it must not be scrambled."""
    import torch

    c = cfg(iterations=8, milestones=(6,))
    part = train(c, root=tmp_path / "a", data=cifar, device="cpu", stop_after=3)
    ck = part.path / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    bufs = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert any(b.dim() == 4 for b in bufs)
    for s in state["optimizer"]["state"].values():
        if s["momentum_buffer"].dim() == 4:
            s["momentum_buffer"] = s["momentum_buffer"].contiguous(memory_format=torch.channels_last)
    torch.save(state, ck)
    resumed = train(c, root=tmp_path / "a", data=cifar, device="cpu")
    straight = train(c, root=tmp_path / "b", data=cifar, device="cpu")
    a = torch.load(resumed.path / "model.pt", weights_only=True)
    b = torch.load(straight.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_net_is_set_aside_and_the_run_starts_over(cifar, tmp_path, caplog):
    """A readable checkpoint that does not fit (another version of the net) must not fail every call."""
    import torch

    from resnet_lab.models import model_from_config

    c = cfg(iterations=6, milestones=(4,))
    part = train(c, root=tmp_path, data=cifar, device="cpu", stop_after=3)
    ck = part.path / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["model"] = model_from_config(cfg(depth=14)).state_dict()
    torch.save(state, ck)
    with caplog.at_level("WARNING"):
        done = train(c, root=tmp_path, data=cifar, device="cpu")
    assert done.status == "done" and "failed to load" in caplog.text
    assert list(part.path.glob("checkpoint.pt.bad-*"))
    straight = train(c, root=tmp_path / "b", data=cifar, device="cpu")
    pd.testing.assert_frame_equal(done.metrics[COLS], straight.metrics[COLS], check_exact=True)


def test_a_run_that_cannot_start_says_so_in_its_summary(cifar, tmp_path, monkeypatch):
    import importlib

    T = importlib.import_module("resnet_lab.train")  # the module, not the `train` function re-exported
    c = cfg()

    def boom(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(T, "Stepper", boom)
    with pytest.raises(RuntimeError, match="no kernel"):
        T.train(c, root=tmp_path, data=cifar, device="cpu")
    s = json.loads((R.RunDir(T.resolve_dataset(c, cifar), tmp_path).summary_file).read_text())
    assert s["status"] == "failed" and "no kernel" in s["error"]


def _ctrl_c_at_step(monkeypatch, T, step: int, presses: int = 1) -> None:
    """SIGINT this process `presses` times inside training step `step`, after its weights moved but before the
    step is booked: where a KeyboardInterrupt raised at once would leave the weights a step ahead."""
    real = T._Run.account

    def account(self, *a, **k):
        if self.step_no == step and not getattr(self, "_pressed", False):
            self._pressed = True
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(T._Run, "account", account)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(cifar, tmp_path, monkeypatch):
    """Ctrl-C is a time budget running out, not a failure: the run keeps a checkpoint at a step boundary, stays
    'running' on disk (`train --list` says stopped) and resumes to the uninterrupted result."""
    import importlib

    T = importlib.import_module("resnet_lab.train")
    c = T.resolve_dataset(cfg(), cifar)
    _ctrl_c_at_step(monkeypatch, T, 4)
    with pytest.raises(KeyboardInterrupt, match=rf"stopped {c.name} seed 0 at step 5, with a checkpoint: the same "
                                                r"call \(in a notebook, the cell run again\) resumes"):
        T.train(c, root=tmp_path / "a", data=cifar, device="cpu", progress=False)
    rd = R.RunDir(c, tmp_path / "a")
    assert rd.summary()["status"] == "running" and rd.summary()["steps_done"] == 5
    assert rd.checkpoint_file.exists() and not rd.model_file.exists() and rd.live_status() == "stopped"
    monkeypatch.undo()
    resumed = T.train(c, root=tmp_path / "a", data=cifar, device="cpu")
    straight = T.train(c, root=tmp_path / "b", data=cifar, device="cpu")
    pd.testing.assert_frame_equal(resumed.metrics[COLS], straight.metrics[COLS], check_exact=True)


def test_a_second_ctrl_c_stops_at_once_and_a_packed_ctrl_c_starts_no_further_run(cifar, tmp_path, monkeypatch):
    import importlib

    T = importlib.import_module("resnet_lab.train")
    c, d = (T.resolve_dataset(cfg(seed=s), cifar) for s in (0, 1))
    _ctrl_c_at_step(monkeypatch, T, 4, presses=2)  # stops mid-step: left as a kill leaves it, never 'failed'
    with pytest.raises(KeyboardInterrupt):
        T.train(c, root=tmp_path, data=cifar, device="cpu", progress=False, checkpoint_every_s=0)
    assert R.RunDir(c, tmp_path).summary()["status"] == "running"
    monkeypatch.undo()
    _ctrl_c_at_step(monkeypatch, T, 6)
    with pytest.raises(KeyboardInterrupt, match=rf"^stopped {c.name} seed 0 at step 7, with a checkpoint"):
        T.train_many([c, d], root=tmp_path, data=cifar, device="cpu", pack=1, progress=False)
    assert R.RunDir(c, tmp_path).summary()["steps_done"] == 7 and R.RunDir(c, tmp_path).checkpoint_file.exists()
    assert R.RunDir(d, tmp_path).summary() is None  # the next pack never started


def test_with_a_time_budget_a_run_locked_elsewhere_is_left_not_waited_for(cifar, tmp_path):
    """A pack under a time budget does not sit idle on a lock another process holds: that run is left to it
    (reported as not trained), the others train; one run alone returns at once too."""
    from resnet_lab.train import train_many

    import fcntl
    import threading

    held, free = cfg(seed=0, dataset=cifar.info.sha256[:16]), cfg(seed=1, dataset=cifar.info.sha256[:16])
    folder = R.RunDir(held, tmp_path).path
    folder.mkdir(parents=True)
    R.lock_file(folder).parent.mkdir(parents=True)
    lock = open(R.lock_file(folder), "w")  # another trainer's (flock is per open file, so this process too)
    fcntl.flock(lock, fcntl.LOCK_EX)
    release = threading.Timer(300, lock.close)  # had the trainer waited, it would train `held` after this
    release.start()
    try:
        recs = train_many([held, free], root=tmp_path, data=cifar, device="cpu", pack=2, time_budget_s=600)
        alone = train(held, root=tmp_path, data=cifar, device="cpu", time_budget_s=600)
    finally:
        release.cancel()
        lock.close()
    assert recs[0].status == "locked" and recs[1].status == "done" and recs[1].summary["packed_runs"] == 1
    assert alone.status == "locked" and not (folder / "summary.json").exists()  # never started here


def test_a_run_that_cannot_start_keeps_the_progress_its_checkpoint_has(cifar, tmp_path, monkeypatch):
    """Marked failed, it keeps steps_done and its sittings: import and `--list` rank it by them (a summary
    of status and error alone let an older copy replace its checkpoint)."""
    import importlib

    T = importlib.import_module("resnet_lab.train")
    c = cfg()
    part = train(c, root=tmp_path, data=cifar, device="cpu", stop_after=4)

    def broken(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(T, "Stepper", broken)
    with pytest.raises(RuntimeError):
        train(c, root=tmp_path, data=cifar, device="cpu")
    s = json.loads((part.path / "summary.json").read_text())
    assert s["status"] == "failed" and "out of memory" in s["error"] and s["steps_done"] == 4 and s["sittings"]
    assert (part.path / "checkpoint.pt").exists()
