"""Run folders travel from the GPU machine in size-limited parts and merge without losing progress."""
import io
import json
import os
import re
import tarfile

import pytest

from resnet_lab.config import make_config
from resnet_lab.transfer import export_runs, import_runs

# three real configs: a run folder is named by its config's hash, and import checks that
CFGS = {k: make_config("smoke", seed=i) for i, k in enumerate(("aaa", "bbb", "ccc"))}
HASH = {k: c.hash for k, c in CFGS.items()}


def make_run(root, key, status, steps, big=0):
    d = root / HASH[key]
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"status": status, "steps_done": steps}))
    (d / "config.json").write_text(json.dumps({**CFGS[key].to_json(), "hash": HASH[key]}))
    (d / "metrics.csv").write_text("step\n")
    (d / "checkpoint.pt").write_bytes(os.urandom(big))  # incompressible, like weights
    (d / "checkpoint.prev.pt").write_bytes(b"p")
    (d / ".lock").write_text("")
    if status == "done":
        (d / "model.pt").write_bytes(bytes(range(256)) * 40)
    return d


def test_export_splits_and_import_merges(tmp_path):
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    make_run(gpu, "aaa", "done", 100)
    make_run(gpu, "bbb", "running", 50, big=300_000)
    make_run(gpu, "ccc", "running", 10)
    make_run(here, "aaa", "running", 30)  # behind: replaced
    make_run(here, "ccc", "running", 20)  # ahead of the incoming copy: kept
    parts = export_runs(tmp_path / "out", root=gpu, checkpoints=True, part_mb=0.1)
    assert len(parts) >= 2 and all(p.stat().st_size <= 0.1 * 2**20 for p in parts)
    result = import_runs(list(reversed(parts)), root=here)
    assert result == {HASH["aaa"]: "imported", HASH["bbb"]: "imported", HASH["ccc"]: "kept local"}
    aaa, bbb, ccc = (here / HASH[k] for k in ("aaa", "bbb", "ccc"))
    assert json.loads((aaa / "summary.json").read_text())["status"] == "done"
    assert (aaa / "model.pt").exists() and not (aaa / "checkpoint.pt").exists()
    assert (bbb / "checkpoint.pt").stat().st_size == 300_000  # unfinished: checkpoint came along
    assert not (bbb / "checkpoint.prev.pt").exists()
    assert json.loads((ccc / "summary.json").read_text())["steps_done"] == 20
    assert sorted(os.listdir(here)) == [".locks", *sorted(HASH.values())]  # nothing staged left behind (the locks stay)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        assert sorted({n.split("/")[1] for n in t.getnames()}) == [
            "checkpoint.pt", "config.json", "metrics.csv", "model.pt", "summary.json"]  # no .lock, no prev
    plain = export_runs(tmp_path / "out2", root=gpu)  # default: no checkpoints at all
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in plain))) as t:
        assert not [n for n in t.getnames() if "checkpoint" in n]


def test_import_refuses_paths_outside_the_store(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    part = tmp_path / "evil.tar.gz.000"
    part.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="escaped.txt"):
        import_runs([part], root=tmp_path / "store")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_parts_of_two_exports_are_refused(tmp_path):
    with pytest.raises(ValueError, match="more than one export"):
        import_runs([tmp_path / "a.tar.gz.000", tmp_path / "b.tar.gz.000"], root=tmp_path)
    with pytest.raises(ValueError, match="part_mb=0 is not valid"):
        export_runs(tmp_path, root=tmp_path, part_mb=0)


def _names(parts):
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        return sorted({n.split("/")[0] for n in t.getnames()})


def test_export_skips_what_the_other_side_has_and_stays_under_max_mb(tmp_path):
    """Each call of the GPU session brings back only what is new here, and no more than one call can carry."""
    from resnet_lab.transfer import manifest

    gpu, here = tmp_path / "gpu", tmp_path / "here"
    make_run(gpu, "aaa", "done", 100)
    make_run(gpu, "bbb", "running", 50, big=95_000)  # under 0.1 MiB alone, not beside ccc
    make_run(gpu, "ccc", "done", 100)
    make_run(here, "aaa", "done", 100)  # already here: stays out
    make_run(here, "ccc", "running", 40)  # here but behind: goes
    have = manifest(here)
    assert have[HASH["ccc"]] == {"status": "running", "steps_done": 40, "checkpoint": True, "analyses": [],
                                 "weights": False}
    parts = export_runs(tmp_path / "o1", root=gpu, checkpoints=True, skip=have)
    assert _names(parts) == sorted([HASH["bbb"], HASH["ccc"]])
    # room for the finished run only: it goes first, the big unfinished one waits for the next export
    parts = export_runs(tmp_path / "o2", root=gpu, checkpoints=True, skip=have, max_mb=0.1)
    assert _names(parts) == [HASH["ccc"]]
    import_runs(parts, root=here)
    parts = export_runs(tmp_path / "o3", root=gpu, checkpoints=True, skip=manifest(here), max_mb=1)
    assert _names(parts) == [HASH["bbb"]]
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(ValueError, match="max_mb="):
            export_runs(tmp_path / "o4", root=gpu, max_mb=bad)
    with pytest.raises(ValueError, match="manifest"):
        export_runs(tmp_path / "o4", root=gpu, skip=["not", "a", "manifest"])


def test_runs_sent_again_for_their_analyses_only_wait_behind_checkpoints(tmp_path):
    """A run analysed on the GPU goes back whole (model.pt too), though the receiver has its weights; under
    max_mb it must not keep a pack's checkpoints from coming back (lost with the machine: step 0 again)."""
    from resnet_lab.transfer import manifest

    gpu, here = tmp_path / "gpu", tmp_path / "here"
    for key in ("aaa", "ccc"):
        make_run(here, key, "done", 100)
        make_run(gpu, key, "done", 100)
        (gpu / HASH[key] / f"analysis-unravel-{'0' * 12}.json").write_text("{}")  # computed there
    make_run(gpu, "bbb", "running", 50, big=60_000)
    have = manifest(here)
    parts = export_runs(tmp_path / "o1", root=gpu, checkpoints=True, skip=have, max_mb=0.07)
    assert _names(parts) == [HASH["bbb"]]  # the checkpoint first; the analyses wait (and are computed again)
    roomy = export_runs(tmp_path / "o2", root=gpu, checkpoints=True, skip=have, max_mb=1)
    assert _names(roomy) == sorted(HASH.values())
    make_run(tmp_path / "bare", "ccc", "running", 10)  # a receiver without ccc's weights: ccc is news there
    parts = export_runs(tmp_path / "o3", root=gpu, checkpoints=True, skip=manifest(tmp_path / "bare"), max_mb=0.07)
    assert _names(parts) == sorted([HASH["aaa"], HASH["ccc"]])  # finished news first, as before


def test_back_to_back_exports_on_one_machine_send_each_run_once(tmp_path, monkeypatch, capsys):
    """Calls on one warm machine share a stale --skip manifest; the --sent ledger keeps them from sending
    the first call's runs again (under --max-mb: from sending only those, every call)."""
    from resnet_lab import cli
    from resnet_lab.transfer import manifest

    gpu, here, ledger = tmp_path / "gpu", tmp_path / "here", tmp_path / "state" / "sent.json"
    make_run(gpu, "aaa", "done", 100)
    make_run(gpu, "bbb", "done", 100)
    have = manifest(here)  # written here before the first call: knows of neither
    one_run = 0.02  # MiB: room for one finished run
    first = export_runs(tmp_path / "o1", root=gpu, skip=have, max_mb=one_run, sent=ledger)
    second = export_runs(tmp_path / "o2", root=gpu, skip=have, max_mb=one_run, sent=ledger)
    one, other = sorted([HASH["aaa"], HASH["bbb"]])  # runs go in the order of their folders' names
    assert _names(first) == [one] and _names(second) == [other]
    assert first.runs == [one] and second.held_by_sent == [one] and not second.held_by_skip
    third = export_runs(tmp_path / "o3", root=gpu, skip=have, sent=ledger)
    assert _names(third) == [] and third.held_by_sent == sorted([HASH["aaa"], HASH["bbb"]])
    import shutil

    shutil.copytree(gpu, tmp_path / "res" / "runs")  # the same store where the CLI looks: it says why nothing went
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(tmp_path / "res"))
    assert cli.main(["runs", "export", str(tmp_path / "o3b"), "--sent", str(ledger)]) == 0
    err = capsys.readouterr().err
    assert "0 run(s) in this export" in err and f"2 left out: {ledger} says an earlier export" in err
    assert f"delete {ledger}" in err
    monkeypatch.delenv("RESNET_LAB_RESULTS")
    make_run(gpu, "ccc", "running", 50, big=1000)
    assert _names(export_runs(tmp_path / "o4", root=gpu, checkpoints=True, skip=have, sent=ledger)) == [HASH["ccc"]]
    make_run(gpu, "ccc", "running", 80, big=1000)  # trained on after it was sent: goes again
    assert _names(export_runs(tmp_path / "o5", root=gpu, checkpoints=True, skip=have, sent=ledger)) == [HASH["ccc"]]
    assert json.loads(ledger.read_text())[HASH["ccc"]]["steps_done"] == 80
    assert one in _names(export_runs(tmp_path / "o6", root=gpu, skip=have, max_mb=one_run))  # no ledger
    for parts in (first, second):
        import_runs(parts, root=here)
    assert sorted(manifest(here)) == sorted([HASH["aaa"], HASH["bbb"]])
    ledger.write_text("[1, 2]")  # damaged: refused, naming it, and no parts written
    monkeypatch.setenv("RESNET_LAB_RESULTS", str(gpu.parent))
    with pytest.raises(SystemExit) as e:
        cli.main(["runs", "export", str(tmp_path / "o7"), "--sent", str(ledger)])
    assert e.value.code == 2 and str(ledger) in capsys.readouterr().err and not (tmp_path / "o7").exists()


def test_a_run_bigger_than_max_mb_is_named_as_never_fitting(tmp_path, caplog):
    """A finished ResNet-1202's 78 MB of weights pass no 60 MiB export: the warning says so, and how to bring
    it back. An unfinished one's checkpoint (155 MB) stays behind, and its curve and summary so far travel."""
    gpu = tmp_path / "gpu"
    make_run(gpu, "aaa", "done", 100)
    make_run(gpu, "bbb", "running", 50, big=300_000)  # its checkpoint alone is over 0.1 MiB
    (make_run(gpu, "ccc", "done", 100) / "model.pt").write_bytes(os.urandom(300_000))  # finished, over it
    parts = export_runs(tmp_path / "o", root=gpu, checkpoints=True, max_mb=0.1)
    assert _names(parts) == sorted([HASH["aaa"], HASH["bbb"]])
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        assert sorted(n.split("/")[1] for n in t.getnames() if n.startswith(HASH["bbb"])) == [
            "config.json", "metrics.csv", "summary.json"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"run {HASH['ccc']} alone is over 0.1 MiB" in warned and "without --max-mb" in warned
    assert f"run {HASH['bbb']} goes without its checkpoint" in warned
    assert "left for the next export" not in warned  # waiting for a later export would never help
    here = tmp_path / "here"
    assert import_runs(parts, root=here)[HASH["bbb"]] == "imported"  # progress here, to be seen
    assert json.loads((here / HASH["bbb"] / "summary.json").read_text())["steps_done"] == 50
    whole = export_runs(tmp_path / "all", root=gpu, checkpoints=True, part_mb=0.1)  # parts, brought back a few a call
    result = import_runs(whole, root=here)
    assert result[HASH["ccc"]] == "imported" and (here / HASH["ccc"] / "model.pt").stat().st_size == 300_000
    assert (here / HASH["bbb"] / "checkpoint.pt").stat().st_size == 300_000

def _no_checkpoint(run):
    for n in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / n).unlink()
    return run


def _steps(run):
    return json.loads((run / "summary.json").read_text())["steps_done"]


@pytest.mark.parametrize("local, incoming, winner", [
    # (status, steps, has a checkpoint) of each copy; a copy that resumes beats one that would start at step 0
    (("running", 5, True), ("running", 227, False), "local"),
    (("running", 227, False), ("running", 100, True), "incoming"),
    (("failed", 50, True), ("running", 40, True), "local"),  # a failed run with a checkpoint resumes too
    (("failed", 50, True), ("running", 60, True), "incoming"),
    (("failed", 80, False), ("running", 60, False), "incoming"),  # neither resumes: status, then steps
    (("running", 5, True), ("done", 6, False), "incoming"),  # finished beats any unfinished copy
    (("done", 6, False), ("running", 5, True), "local"),
])
def test_import_keeps_the_copy_that_can_resume(tmp_path, local, incoming, winner):
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    src = make_run(gpu, "aaa", *incoming[:2])
    if not incoming[2]:
        _no_checkpoint(src)
    dst = make_run(here, "aaa", *local[:2])
    if not local[2]:
        _no_checkpoint(dst)
    parts = export_runs(tmp_path / "out", root=gpu, checkpoints=True)
    result = import_runs(parts, root=here)[HASH["aaa"]]
    assert result.startswith("kept local" if winner == "local" else "imported"), result
    kept = local if winner == "local" else incoming
    assert _steps(dst) == kept[1]
    assert (dst / "checkpoint.pt").exists() == (kept[2] and kept[0] != "done")
    # the exporting side, told what this store has, agrees: it sends the run only where import would take it
    parts = export_runs(tmp_path / "again", root=gpu, checkpoints=True, skip=manifest_of(tmp_path, here, local))
    assert _names(parts) == ([HASH["aaa"]] if winner == "incoming" else [])


def manifest_of(tmp_path, here, local):
    """The receiving store's manifest as it was before the import (local's copy)."""
    from resnet_lab.transfer import manifest

    before = tmp_path / "before"
    run = make_run(before, "aaa", *local[:2])
    if not local[2]:
        _no_checkpoint(run)
    return manifest(before)


def test_export_compares_what_it_sends_and_reads_old_manifests(tmp_path):
    """A checkpoint left behind (no --checkpoints, or over --max-mb) makes the copy sent one that cannot
    resume: a manifest whose copy resumes keeps it out. A manifest written before checkpoints were listed
    says none: the run goes, and import keeps whichever copy resumes."""
    from resnet_lab.transfer import manifest

    gpu, here = tmp_path / "gpu", tmp_path / "here"
    make_run(gpu, "aaa", "running", 227, big=300_000)
    make_run(here, "aaa", "running", 5)
    have = manifest(here)
    assert have[HASH["aaa"]]["checkpoint"] is True
    assert _names(export_runs(tmp_path / "o1", root=gpu, skip=have)) == []  # without checkpoints
    assert _names(export_runs(tmp_path / "o2", root=gpu, checkpoints=True, skip=have, max_mb=0.1)) == []
    assert _names(export_runs(tmp_path / "o3", root=gpu, checkpoints=True, skip=have)) == [HASH["aaa"]]
    old = {h: {k: v for k, v in e.items() if k != "checkpoint"} for h, e in have.items()}
    parts = export_runs(tmp_path / "o4", root=gpu, skip=old)
    assert _names(parts) == [HASH["aaa"]]
    assert import_runs(parts, root=here)[HASH["aaa"]].startswith("kept local: it resumes")
    assert _steps(here / HASH["aaa"]) == 5 and (here / HASH["aaa"] / "checkpoint.pt").exists()
    # the other way round: the copy that resumes comes in over one further along without a checkpoint, and says so
    there = tmp_path / "there"
    make_run(there, "aaa", "running", 227)
    (there / HASH["aaa"] / "checkpoint.pt").unlink()
    (there / HASH["aaa"] / "checkpoint.prev.pt").unlink()
    what = import_runs(export_runs(tmp_path / "o5", root=here, checkpoints=True), root=there)[HASH["aaa"]]
    assert what == "imported: it resumes from its checkpoint, the local copy at step 227 had none"
    assert _steps(there / HASH["aaa"]) == 5
    make_run(gpu, "bbb", "diverged", 2)  # finished beats unfinished, whatever the steps: said as it is
    (gpu / HASH["bbb"] / "model.pt").write_bytes(b"weights of a diverged run")
    make_run(here, "bbb", "running", 5)
    what = import_runs(export_runs(tmp_path / "o6", root=gpu), root=here)[HASH["bbb"]]
    assert what == "imported: diverged at step 2, over a local copy running at step 5"


def test_a_bad_manifest_entry_or_ledger_is_named(tmp_path):
    """s25 audit E13: {"abc": {"steps_done": "x"}} was accepted (`train --list` then printed "step x/6"), a bad
    entry was not named, and a bad --sent ledger did not say it was the ledger."""
    from resnet_lab.transfer import export_runs, read_manifest

    bad = tmp_path / "m.json"
    for text, needle in (('{"abc": 5}', "its entry 'abc' is 5, not an object"),
                         ('{"abc": {"status": "done", "steps_done": "x"}}', "its entry 'abc' has steps_done='x'")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(needle)):
            read_manifest(bad)
    bad.write_text('{"abc": {"status": null, "steps_done": null}}')  # a run folder without a summary: as written
    assert read_manifest(bad)["abc"]["steps_done"] is None
    with pytest.raises(ValueError, match="--sent ledger"):
        export_runs(tmp_path / "out", sent=tmp_path)
