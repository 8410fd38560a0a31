"""Nothing lost on a local run (issue 6): kill -9, Ctrl-C / SIGTERM, a full disk, a removed run directory, two runs
of one name at once. Real `python app.py` processes, real signals, a real full filesystem (tmpfs, needs root)."""

import csv
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_launch import logged_steps
from test_train import TINY, tiny_job

from dogclf.checkpointing import atomic_torch_save
from dogclf.config import REPO_ROOT
from dogclf.train import Interrupted, train

EPOCHS = 4


def app(white_dogs: Path, output: Path, *extra: str) -> list[str]:
    """`python app.py` for a tiny local run named `tiny` in `output`: running it again resumes it."""
    settings = [*TINY, "data.batch_size=4", f"trainer.max_epochs={EPOCHS}", *extra]
    return [sys.executable, str(REPO_ROOT / "app.py"), "--data", str(white_dogs), "--output", str(output),
            "--name", "tiny", *[arg for item in settings for arg in ("--set", item)]]


def launch(command: list[str], logs: Path, name: str) -> subprocess.Popen:
    """Start `command` in a session of its own (a signal to its group is a terminal's Ctrl-C); output in files."""
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=err, start_new_session=True)


def finish(process: subprocess.Popen, logs: Path, name: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a process `launch`ed as `name`."""
    process.wait(timeout=300)
    return process.returncode, (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text()


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit status {process.returncode}) before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def steps_per_epoch(run_dir: Path) -> int:
    with open(run_dir / "split.csv") as handle:
        return math.ceil(sum(row["split"] == "train" for row in csv.DictReader(handle)) / 4)


def last_logged_step(run_dir: Path) -> int:
    return max((step for steps in logged_steps(run_dir) for step in steps), default=-1)


def completed(run_dir: Path, target_step: int) -> None:
    """The run in `run_dir` ended at `target_step` after EPOCHS epochs, one validation point per epoch."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run_dir"] == str(run_dir)
    assert (metrics["epochs"], metrics["global_step"]) == (EPOCHS, target_step)
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == target_step
    spe = target_step // EPOCHS
    assert sum(logged_steps(run_dir, "val/loss"), []) == [spe * epoch - 1 for epoch in range(1, EPOCHS + 1)]


def test_kill_9_mid_epoch_then_the_same_command_resumes_from_the_last_epoch_end(white_dogs, tmp_path):
    command = app(white_dogs, tmp_path, "data.max_per_class=30")  # 14 steps per epoch: time to land mid-epoch
    run_dir = tmp_path / "tiny"
    killed = launch(command, tmp_path, "killed")
    wait_for((run_dir / "split.csv").is_file, killed)
    spe = steps_per_epoch(run_dir)
    wait_for(lambda: last_logged_step(run_dir) > 2 * spe, killed)  # two steps into the third epoch
    killed.kill()
    assert finish(killed, tmp_path, "killed")[0] == -signal.SIGKILL
    saved, done = checkpoint_step(run_dir / "checkpoints" / "last.ckpt"), last_logged_step(run_dir) + 1
    assert saved == 2 * spe < done  # killed mid-epoch: the steps since the last epoch end are lost

    status, out, err = finish(launch(command, tmp_path, "again"), tmp_path, "again")
    assert status == 0, err
    assert f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    completed(run_dir, EPOCHS * spe)
    before, after = logged_steps(run_dir)
    assert before == list(range(done)) and after == list(range(saved, EPOCHS * spe))  # the step goes on from saved
    assert done - saved <= spe  # at most one checkpoint interval (an epoch) redone


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_saves_a_checkpoint_mid_epoch_and_the_run_resumes_there(white_dogs, tmp_path, signum):
    command = app(white_dogs, tmp_path)
    run_dir = tmp_path / "tiny"
    last = run_dir / "checkpoints" / "last.ckpt"
    stopped = launch(command, tmp_path, "stopped")
    wait_for(last.is_file, stopped)  # the first epoch is done
    os.killpg(stopped.pid, signum)  # to the process group, as a terminal sends Ctrl-C
    status, _, err = finish(stopped, tmp_path, "stopped")
    spe, step = steps_per_epoch(run_dir), checkpoint_step(last)
    assert status == 128 + signum
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted ({signal.Signals(signum).name}) at step {step}; checkpoint saved "
                                    f"to {last}; run the same command again to resume")
    assert spe < step < EPOCHS * spe and step % spe  # written at the signal, mid-epoch

    status, out, err = finish(launch(command, tmp_path, "resumed"), tmp_path, "resumed")
    assert status == 0, err
    completed(run_dir, EPOCHS * spe)  # the interrupted epoch was not made longer
    assert logged_steps(run_dir) == [list(range(step)), list(range(step, EPOCHS * spe))]  # nothing redone


class Batches(pl.Callback):
    """Records the labels of every training batch; sends this process SIGTERM once `stop_at` steps are done."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.labels: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.labels.append(batch[1].tolist())
        if trainer.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(("workers", "signal_at", "stop_at"), [(0, 8, 8), (1, 6, 7)])
def test_a_run_resumed_mid_epoch_trains_the_rest_of_that_epoch(white_dogs, tmp_path, workers, signal_at, stop_at):
    """6 steps per epoch: a signal after step 8 stops there; one after step 6, the end of the first epoch, stops a
    batch into the second (a checkpoint between the last batch and the epoch's validation would not resume)."""
    def job(output):
        return tiny_job(white_dogs, output, "data.batch_size=4", "trainer.max_epochs=2", f"data.num_workers={workers}")

    whole, first, rest = Batches(), Batches(stop_at=signal_at), Batches()
    train(job(tmp_path / "whole"), callbacks=[whole])
    with pytest.raises(Interrupted, match=f"at step {stop_at}; checkpoint saved"):
        train(job(tmp_path / "split"), callbacks=[first])
    train(job(tmp_path / "split"), callbacks=[rest])
    assert len(first.labels) == stop_at and first.labels + rest.labels == whole.labels  # the same batches, in order


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, unmounted afterwards: room for a run, and a disk that fills in a moment."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as handle, pytest.raises(OSError) as full:
        while True:
            handle.write(bytes(1 << 16))
    assert full.value.errno == errno.ENOSPC


def test_atomic_save_on_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk):
    path = small_disk / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    fill(small_disk)
    with pytest.raises(OSError) as full:
        atomic_torch_save({"step": 2, "weights": torch.zeros(1 << 20)}, path)
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(path))  # not torch's "unexpected pos"
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.ckpt"]  # no temporary left


def test_atomic_save_does_not_make_a_removed_folder_again(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_torch_save({"step": 1}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "run").exists()


def test_disk_full_mid_run_is_a_one_line_error_and_the_last_checkpoint_stays_whole(white_dogs, small_disk, tmp_path):
    run_dir = small_disk / "tiny"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = launch(app(white_dogs, small_disk), tmp_path, "run")
    wait_for(last.is_file, process)
    fill(small_disk)
    saved = checkpoint_step(last)
    status, _, err = finish(process, tmp_path, "run")
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: no space left on the disk of {run_dir}: free space, then run the same "
                                    "command again to resume from the last checkpoint, which is intact")
    assert checkpoint_step(last) == saved  # loads with weights_only=True: whole
    assert not list(last.parent.glob(".*.tmp"))


def test_run_directory_removed_mid_run_stops_with_a_one_line_error(white_dogs, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    process = launch(app(white_dogs, tmp_path / "runs"), tmp_path, "run")
    wait_for((run_dir / "checkpoints" / "last.ckpt").is_file, process)
    run_dir.rename(tmp_path / "gone")  # `rm -rf` in one step (rmtree could race the run's next write)
    shutil.rmtree(tmp_path / "gone")
    status, _, err = finish(process, tmp_path, "run")
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: {run_dir} was removed during the run: nothing more can be saved there; "
                                    "run the same command again to start the run afresh")
    assert not run_dir.exists()  # not silently made again


def test_two_runs_of_one_name_at_once_get_a_directory_each(white_dogs, tmp_path):
    command = app(white_dogs, tmp_path)
    runs = [launch(command, tmp_path, name) for name in ("one", "two")]
    results = [finish(process, tmp_path, name) for process, name in zip(runs, ("one", "two"))]
    assert [status for status, _, _ in results] == [0, 0], [err for _, _, err in results]
    notices = [line for _, out, _ in results for line in out.splitlines() if "in use by another run" in line]
    assert notices == [f"{tmp_path / 'tiny'} is in use by another run: this run uses {tmp_path / 'tiny-2'} (resume "
                       "it with --name tiny-2)"]
    for run_dir in (tmp_path / "tiny", tmp_path / "tiny-2"):
        target = EPOCHS * steps_per_epoch(run_dir)
        completed(run_dir, target)
        assert logged_steps(run_dir) == [list(range(target))]  # one process trained here, every step once
        assert (run_dir / "config.yaml").is_file()
