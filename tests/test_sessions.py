"""A paper grid takes several GPU sessions, each on a bare machine. The next one is sent this store's manifest
and the unfinished runs' checkpoints: it trains only what is still missing, resumes the rest where it stopped,
and what comes back merges here as if one machine had trained it all."""
from __future__ import annotations

import logging

import pandas as pd

from resnet_lab import cli, experiments as ex
from resnet_lab.runs import RunDir
from resnet_lab.sweep import grid_configs, load_grid
from resnet_lab.train import train

from .conftest import needs_data

GRID = "notebook: 01_degradation\npreset: smoke\nparameters:\n  depths: [[8]]\n  seeds: [[0]]\n"


def _parts(folder, name="runs"):
    return sorted(map(str, folder.glob(f"{name}.tar.gz.*")))


@needs_data
def test_a_later_session_trains_only_what_is_missing_and_resumes_the_rest(tmp_path, monkeypatch, cifar, capsys,
                                                                          caplog):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    gpu1, here, gpu2 = tmp_path / "gpu1", tmp_path / "here", tmp_path / "gpu2"
    use = lambda store: monkeypatch.setenv("RESNET_LAB_RESULTS", str(store))
    cfgs = ex.with_dataset(grid_configs(load_grid(grid)))
    done, part = cfgs  # plain-8 finishes in session 1; resnet-8's time budget runs out at step 3
    use(gpu1)
    train(done, data=cifar, device="cpu", progress=False)
    train(part, data=cifar, device="cpu", progress=False, stop_after=3)
    assert cli.main(["runs", "export", str(tmp_path / "back1"), "--checkpoints"]) == 0
    use(here)
    assert cli.main(["runs", "import", *_parts(tmp_path / "back1")]) == 0

    # what the next session is sent: the manifest, and only the unfinished run with its checkpoint
    have, send = tmp_path / "send" / "have.json", tmp_path / "send"
    assert cli.main(["runs", "manifest", str(have)]) == 0
    assert cli.main(["runs", "export", str(send), "--name", "resume", "--checkpoints", "--unfinished"]) == 0
    use(gpu2)
    capsys.readouterr()
    assert cli.main(["runs", "import", *_parts(send, "resume")]) == 0
    assert capsys.readouterr().out.split() == [part.hash, "imported"]
    assert (RunDir(part).path / "checkpoint.pt").exists()

    assert cli.main(["train", "--sweep", str(grid), "--skip", str(have), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith(done.hash) and " done " in listed[0] and f"(in {have}: not trained here)" in listed[0]
    assert listed[1].startswith(part.hash) and "stopped  step 3/6" in listed[1] and "not trained here" not in listed[1]
    with caplog.at_level(logging.INFO, logger="resnet_lab.train"):
        assert cli.main(["train", "--sweep", str(grid), "--skip", str(have), "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{done.name} seed 0: done in {have} (not trained here)" in out and " done at step 6" in out, out
    assert f"resuming {part.name} at step 3" in caplog.text
    assert not RunDir(done).path.exists()  # never trained again

    # back here: the resumed run finishes as if trained in one go
    assert cli.main(["runs", "export", str(tmp_path / "back2"), "--checkpoints", "--skip", str(have)]) == 0
    use(here)
    assert cli.main(["runs", "import", *_parts(tmp_path / "back2")]) == 0
    assert {RunDir(c).status() for c in cfgs} == {"done"}
    straight = train(part, root=tmp_path / "straight", data=cifar, device="cpu", progress=False)
    cols = ["step", "lr", "train_loss", "train_err", "test_loss", "test_err"]
    pd.testing.assert_frame_equal(RunDir(part).metrics()[cols], straight.metrics[cols], check_exact=True)


def test_train_skip_needs_a_readable_manifest(capsys, tmp_path):
    bad = tmp_path / "have.json"
    bad.write_text("[1, 2]")
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    for argv, needles in [(["--sweep", str(grid), "--skip", str(bad)], ["--skip", "have.json", "JSON object"]),
                          (["--sweep", str(grid), "--skip", str(tmp_path / "nope.json")], ["--skip", "nope.json"]),
                          (["--preset", "smoke", "--skip", str(bad)], ["--skip", "have.json", "JSON object"])]:
        try:
            cli.main(["train", *argv, "--list"])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        err = capsys.readouterr().err
        assert all(n in err for n in needles), (argv, err)
