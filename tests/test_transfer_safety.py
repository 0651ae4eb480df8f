"""Crafted, incomplete or racing transfers fail with a clear error and never damage the store."""
import io
import json
import os
import resource
import signal
import stat
import tarfile

import pytest

from resnet_lab.config import make_config
from resnet_lab.runs import atomic_write_text, iter_runs, load_runs, lock_file, lock_run
from resnet_lab.transfer import export_runs, import_runs

A, B = make_config("smoke", seed=0), make_config("smoke", seed=1)


def make_run(root, cfg, status, steps, model=True):
    d = root / cfg.hash
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**cfg.to_json(), "hash": cfg.hash}))
    (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": steps}))
    (d / "metrics.csv").write_text("step\n")
    if status == "done" and model:
        (d / "model.pt").write_bytes(b"weights")
    return d


def archive(tmp_path, members, name="evil"):
    """One-part export built by hand: (TarInfo, bytes or None) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    part = tmp_path / f"{name}.tar.gz.000"
    part.write_bytes(buf.getvalue())
    return part


def member(name, data=None, type_=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, link
    return info, data


def config_bytes(cfg):
    return json.dumps({**cfg.to_json(), "hash": cfg.hash}).encode()


H = A.hash
BAD_MEMBERS = {
    "lock symlink to another run": member(f"{H}/.lock", type_=tarfile.SYMTYPE, link=f"../{B.hash}/summary.json"),
    "symlink with an allowed name": member(f"{H}/summary.json", type_=tarfile.SYMTYPE,
                                           link=f"../{B.hash}/summary.json"),
    "hard link": member(f"{H}/metrics.csv", type_=tarfile.LNKTYPE, link=f"{H}/config.json"),
    "run folder is a symlink": member(H, type_=tarfile.SYMTYPE, link=B.hash),
    "device": member(f"{H}/model.pt", type_=tarfile.CHRTYPE),
    "fifo": member(f"{H}/model.pt", type_=tarfile.FIFOTYPE),
    "other file name": member(f"{H}/.lock", b""),
    "nested path": member(f"{H}/sub/config.json", b"{}"),
    "folder not a hash": member("notahash/config.json", b"{}"),
    "absolute path": member(f"/tmp/{H}/config.json", b"{}"),
    "dot-dot": member(f"{H}/../{B.hash}/summary.json", b"{}"),
    "prev checkpoint": member(f"{H}/checkpoint.prev.pt", b"x"),
    "analysis name not a hash": member(f"{H}/analysis-unravel-../../x.json", b"{}"),
    "analysis kind not lowercase": member(f"{H}/analysis-Unravel-0123456789ab.json", b"{}"),
    "analysis symlink": member(f"{H}/analysis-unravel-0123456789ab.json", type_=tarfile.SYMTYPE,
                               link=f"../{B.hash}/summary.json"),
}


@pytest.mark.parametrize("bad", sorted(BAD_MEMBERS))
def test_import_accepts_only_plain_run_files(tmp_path, bad):
    store = tmp_path / "store"
    other = make_run(store, B, "done", 6)
    before = (other / "summary.json").read_bytes()
    info, data = BAD_MEMBERS[bad]
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)), (info, data)])
    with pytest.raises(ValueError, match="member") as e:
        import_runs([part], root=store)
    assert info.name in str(e.value)
    assert (other / "summary.json").read_bytes() == before
    assert sorted(os.listdir(store)) == [B.hash]


def test_import_refuses_a_config_that_does_not_hash_to_its_folder(tmp_path):
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(B)),
                              member(f"{H}/summary.json", b'{"status": "done"}')])
    with pytest.raises(ValueError, match=f"{H}/config.json"):
        import_runs([part], root=tmp_path / "store")
    part = archive(tmp_path, [member(f"{H}/summary.json", b'{"status": "done"}')], name="noconfig")
    with pytest.raises(ValueError, match="config.json"):
        import_runs([part], root=tmp_path / "store")
    assert not (tmp_path / "store" / H).exists()


def _parts(tmp_path, n=3):
    gpu = tmp_path / "gpu"
    d = make_run(gpu, A, "running", 3)
    (d / "checkpoint.pt").write_bytes(os.urandom(300_000))
    parts = export_runs(tmp_path / "out", root=gpu, checkpoints=True, part_mb=0.1)
    assert len(parts) >= n
    return parts


def test_incomplete_or_damaged_parts_are_a_clear_value_error(tmp_path):
    parts = _parts(tmp_path)
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"part\(s\) runs.tar.gz.001 missing"):
        import_runs([parts[0]] + parts[2:], root=store)
    with pytest.raises(ValueError, match=r"part\(s\) runs.tar.gz.000, runs.tar.gz.001 missing"):
        import_runs(parts[2:], root=store)
    with pytest.raises(ValueError, match="runs.tar.gz.000"):  # the last part missing: the stream ends early
        import_runs(parts[:-1], root=store)
    junk = tmp_path / "junk.tar.gz.000"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="junk.tar.gz.000"):
        import_runs([junk], root=store)
    odd = tmp_path / "runs.tar.gz.x"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="runs.tar.gz.x"):
        import_runs([odd], root=store)
    with pytest.raises(ValueError, match="no parts"):
        import_runs([], root=store)
    assert not (store / H).exists()
    assert import_runs(parts, root=store) == {H: "imported"}


def test_a_run_locked_by_a_trainer_is_skipped_not_swapped(tmp_path):
    store = tmp_path / "store"
    parts = export_runs(tmp_path / "out", root=make_run(tmp_path / "gpu", A, "done", 6).parent)
    local = make_run(store, A, "running", 2)
    with lock_run(local):  # what a trainer holds while training (flock: per open file, this process's too)
        result = import_runs(parts, root=store)
    assert result[H].startswith("skipped")
    assert json.loads((local / "summary.json").read_text())["status"] == "running"
    inode = lock_file(local).stat().st_ino
    assert import_runs(parts, root=store) == {H: "imported"}
    assert json.loads((local / "summary.json").read_text())["status"] == "done"
    assert lock_file(local).stat().st_ino == inode  # waiters and newcomers share one lock: it is not in the folder


def test_leftovers_of_an_interrupted_import_are_hidden_and_harmless(tmp_path):
    store = tmp_path / "store"
    make_run(store, A, "running", 2)
    for left in (f".{H}.replaced", f".{H}.importing"):  # not empty: a plain rename onto them fails
        (store / left).mkdir()
        (store / left / "config.json").write_text(json.dumps(A.to_json()))
    assert [p.name for p, _, _ in iter_runs(store)] == [H]
    assert list(load_runs(store)["hash"]) == [H]
    gpu = make_run(tmp_path / "gpu", A, "done", 6).parent
    (gpu / f".{H}.importing").mkdir()
    (gpu / f".{H}.importing" / "config.json").write_text(json.dumps(A.to_json()))
    parts = export_runs(tmp_path / "out", root=gpu)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        assert all(n.startswith(f"{H}/") for n in t.getnames())
    assert import_runs(parts, root=store) == {H: "imported"}
    assert sorted(os.listdir(store)) == [".locks", H]


def test_export_ships_consistent_runs_and_only_its_own_parts(tmp_path):
    gpu, out = tmp_path / "gpu", tmp_path / "out"
    make_run(gpu, A, "done", 6)
    make_run(gpu, B, "done", 6, model=False)  # finished but its model is gone: must not travel as done
    out.mkdir()
    (out / "runs.tar.gz.007").write_bytes(b"stale part of an earlier export")
    (out / "other.tar.gz.000").write_bytes(b"another export")
    parts = export_runs(out, root=gpu)
    assert sorted(p.name for p in out.iterdir()) == ["other.tar.gz.000", "runs.tar.gz.000"]
    assert import_runs(parts, root=tmp_path / "store") == {H: "imported"}


def test_a_killed_export_leaves_no_cut_part(tmp_path):
    make_run(tmp_path / "gpu", A, "running", 3)
    (tmp_path / "gpu" / H / "checkpoint.pt").write_bytes(os.urandom(300_000))
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_lim = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_lim[1]))
    try:  # the disk "fills" half way through the first part
        with pytest.raises(OSError):
            export_runs(tmp_path / "out", root=tmp_path / "gpu", checkpoints=True, part_mb=0.1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_lim)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e-9, -1.0, 0, 16, True, "3"])
def test_part_mb_must_be_a_sane_size(tmp_path, bad):
    with pytest.raises(ValueError, match=r"part_mb=.*use a number of MiB"):
        export_runs(tmp_path / "out", root=tmp_path, part_mb=bad)


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_an_archive_that_expands_out_of_proportion_is_refused_before_it_fills_memory(tmp_path, monkeypatch):
    """A sparse member (a few bytes standing for gigabytes of zeros) is refused by name; a part of zeros that
    would expand past the ceiling stops there, before the store is touched."""
    from resnet_lab import transfer

    sparse = member(f"{H}/model.pt", b"")
    sparse[0].type = tarfile.GNUTYPE_SPARSE
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)), sparse], name="sparse")
    with pytest.raises(ValueError, match=f"{H}/model.pt.*sparse file"):
        import_runs([part], root=tmp_path / "store")
    monkeypatch.setattr(transfer, "MIN_CEILING", 2**20)  # 1 MiB, so the test needs no gigabytes
    zeros = member(f"{H}/model.pt", bytes(30 * 2**20))  # 30 MiB of zeros: a ~30 KiB part
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)), zeros], name="bomb")
    with pytest.raises(ValueError, match=r"bomb.tar.gz.000: expands past .* MiB \(20x its size\)"):
        import_runs([part], root=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_finished_copy_without_its_model_never_replaces_a_run(tmp_path):
    """Export never sends a finished run without model.pt; a crafted archive that does would replace a local
    copy that can resume with one that claims to be done and has no weights."""
    store = tmp_path / "store"
    local = make_run(store, A, "running", 5)
    (local / "checkpoint.pt").write_bytes(b"resumable")
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)),
                              member(f"{H}/summary.json", b'{"status": "done", "steps_done": 6}')])
    with pytest.raises(ValueError, match=f"run {H} in the archive says done but has no model.pt"):
        import_runs([part], root=store)
    assert (local / "checkpoint.pt").read_bytes() == b"resumable"


def test_a_summary_with_an_infinite_step_count_ranks_as_step_0_not_a_crash(tmp_path):
    store = tmp_path / "store"
    make_run(store, A, "running", 5)
    part = archive(tmp_path, [member(f"{H}/config.json", config_bytes(A)),
                              member(f"{H}/summary.json", b'{"status": "running", "steps_done": 1e999}')])
    assert import_runs([part], root=store) == {H: "kept local"}


def test_a_kill_between_the_swaps_renames_loses_no_run(tmp_path):
    """Killed after moving the local copy aside and before moving the new one in, an import leaves the run only
    in `.<h>.replaced-*`: the next import puts that copy back before it removes leftovers and compares."""
    store = tmp_path / "store"
    local = make_run(store, A, "running", 5)
    (local / "checkpoint.pt").write_bytes(b"resumable")
    os.replace(local, store / f".{H}.replaced-abc")  # what the kill leaves, beside an importing copy
    (store / f".{H}.importing-abc").mkdir()
    (store / f".{H}.importing-abc" / "config.json").write_text("{}")
    older = make_run(tmp_path / "gpu", A, "running", 3).parent  # no checkpoint: behind the local copy
    assert import_runs(export_runs(tmp_path / "out", root=older), root=store) == {H: "kept local"}
    assert (store / H / "checkpoint.pt").read_bytes() == b"resumable"
    assert json.loads((store / H / "summary.json").read_text())["steps_done"] == 5
    # stranded again, and the next import holds another run: it is put back all the same
    os.replace(store / H, store / f".{H}.replaced-def")
    other = make_run(tmp_path / "gpu2", B, "done", 6).parent
    assert import_runs(export_runs(tmp_path / "out2", root=other), root=store) == {B.hash: "imported"}
    assert (store / H / "checkpoint.pt").read_bytes() == b"resumable" and not list(store.glob(f".{H}.*"))


def test_a_mistyped_part_number_gives_a_short_error(tmp_path):
    parts = _parts(tmp_path)
    far = parts[0].with_name("runs.tar.gz.3000000")
    far.write_bytes(b"")
    with pytest.raises(ValueError) as e:
        import_runs([parts[0], far], root=tmp_path / "store")
    assert "runs.tar.gz.001" in str(e.value) and "2,999,994 more" in str(e.value) and len(str(e.value)) < 300


def test_recovery_takes_the_best_whole_copy_an_interrupted_import_left(tmp_path):
    """Killed between the renames, an import leaves the old copy (.replaced-X) and the new one it was bringing
    (.importing-X, whole: staging ends first); the better of them comes back, even over a run restarted since,
    and a folder that only looks like a leftover makes no run folder."""
    store = tmp_path / "store"
    older = make_run(store, A, "running", 5)
    os.replace(older, store / f".{H}.replaced-x")
    newer = make_run(tmp_path / "staging", A, "done", 6)
    os.replace(newer, store / f".{H}.importing-x")
    restarted = make_run(store, A, "running", 2)  # a trainer started it again at step 0 meanwhile
    (restarted / "checkpoint.pt").write_bytes(b"restart")
    (store / ".0123456789abcdef.replaced-y").mkdir()  # not `.<12 hex>.replaced-`
    cut = store / f".{B.hash}.importing-z"  # cut off while staging (no twin): removed, never used
    cut.mkdir()
    (cut / "config.json").write_text("{}")
    other = make_run(tmp_path / "gpu", B, "done", 6).parent
    assert import_runs(export_runs(tmp_path / "out", root=other), root=store) == {B.hash: "imported"}
    s = json.loads((store / H / "summary.json").read_text())
    assert s["status"] == "done" and (store / H / "model.pt").exists() and not (store / H / "checkpoint.pt").exists()
    assert not list(store.glob(f".{H}.*")) and not cut.exists() and sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) \
        == sorted([H, B.hash])
