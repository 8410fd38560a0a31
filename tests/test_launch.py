"""The cluster launcher against a real Slurm: two slurmd nodes on loopback, started by slurm/cluster/up.sh.

Every job trains the tiny gMLP on a few of the shared photos on CPU (gloo): what is tested is placement, ranks,
sharding, requeue and the run directory, not accuracy.
"""

import csv
import math
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dogclf.config import REPO_ROOT

TINY = [
    "model.preset=gmlp-pico",
    "data.image_size=32",
    "data.max_per_class=8",
    "data.batch_size=4",
    "trainer.log_every_n_steps=1",
    "optim.warmup_epochs=0",
    "trainer.threads=1",
]
LAYOUT = ("config.yaml", "split.csv", "tb", "checkpoints/last.ckpt", "metrics.json", "env")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment of a shell that can talk to the local cluster (SLURM_CONF...), the cluster started if down."""
    up = subprocess.run(["bash", str(REPO_ROOT / "slurm/cluster/up.sh")], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    env_file = re.search(r"source (\S+env\.sh)", up.stdout)
    assert env_file, up.stdout
    dump = subprocess.run(["bash", "-c", f"source {env_file.group(1)} && env -0"], capture_output=True, check=True)
    env = dict(item.split("=", 1) for item in dump.stdout.decode().split("\0") if "=" in item)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` in sbatch scripts = this venv
    return env


def launch(slurm, output, *args, timeout=300):
    """Run launch/submit.py; returns (completed process, job ids it printed)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch/submit.py"), "--output", str(output), *args],
        cwd=REPO_ROOT, env=slurm, capture_output=True, text=True, timeout=timeout,
    )
    return done, re.findall(r"submitted job (\S+)", done.stdout)


def tiny(white_dogs, *extra):
    return [arg for item in [*TINY, f"data.root={white_dogs}", *extra] for arg in ("--set", item)]


def rank_reports(run_dir: Path, job_id: str, tasks: int) -> list[dict]:
    """What each task returned (submitit's result pickles in the run directory)."""
    reports = []
    for task in range(tasks):
        with open(run_dir / "submitit" / f"{job_id}_{task}_result.pkl", "rb") as handle:
            outcome, value = pickle.load(handle)
        assert outcome == "success", value
        reports.append(value)
    return sorted(reports, key=lambda r: r["global_rank"])


def train_size(run_dir: Path) -> int:
    with open(run_dir / "split.csv") as handle:
        return sum(row["split"] == "train" for row in csv.DictReader(handle))


def steps_per_epoch(n_train: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n_train / world_size) / batch_size)


def sacct_state(slurm, job_id: str, wait_s: float = 60) -> str:
    """The job's state in Slurm accounting once it has left PENDING/RUNNING (accounting lags a few seconds)."""
    deadline = time.time() + wait_s
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], env=slurm,
                             capture_output=True, text=True, check=True).stdout
        state = out.split()[0] if out.split() else ""
        if state not in ("", "PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.time() > deadline:
            return state
        time.sleep(1)


def slurm_job_count(slurm) -> int:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-S", "2000-01-01", "-o", "JobID"], env=slurm,
                         capture_output=True, text=True, check=True).stdout
    return len(out.split())


def assert_layout(run_dir: Path) -> None:
    for name in LAYOUT:
        assert (run_dir / name).exists(), f"{run_dir}/{name} missing"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def logged_steps(run_dir: Path, tag: str = "train/loss_step") -> list[list[int]]:
    """Steps at which `tag` was logged, one list per event file holding it (a process writes one file for fitting,
    then others for testing; a requeued job one per attempt), in writing order."""
    per_file = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            per_file.append([event.step for event in accumulator.Scalars(tag)])
    return per_file


def test_two_task_ddp_job_trains_with_disjoint_shards(slurm, white_dogs, tmp_path):
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=2", "--cpus-per-task=1", "--follow", "--name=ddp",
                       *tiny(white_dogs, "trainer.max_epochs=2", "data.sampler=shuffle"))
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = ids
    run_dir = tmp_path / "ddp" / job_id
    assert_layout(run_dir)
    assert f"log (rank 0): {run_dir}/submitit/{job_id}_0_log.out" in done.stdout
    assert f"tensorboard --logdir {tmp_path / 'ddp'}" in done.stdout
    reports = rank_reports(run_dir, job_id, tasks=2)
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["global_rank"] for r in reports] == [0, 1]
    shards = [set(r["first_epoch_indices"]) for r in reports]
    n_train = train_size(run_dir)
    assert shards[0] | shards[1] == set(range(n_train))  # the epoch is covered...
    assert len(shards[0] & shards[1]) <= n_train % 2  # ...by disjoint shards (one index repeated to pad an odd size)
    expected = 2 * steps_per_epoch(n_train, world_size=2, batch_size=4)
    assert reports[0]["global_step"] == reports[1]["global_step"] == expected
    env = (run_dir / "env").read_text()
    assert "world_size=2" in env and f"SLURM_JOB_ID={job_id}" in env and "rank1.hostname=" in env
    assert sacct_state(slurm, job_id) == "COMPLETED"


def test_multi_node_job_spans_both_nodes(slurm, white_dogs, tmp_path):
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--nodes=2", "--gpus=1", "--cpus-per-task=1", "--follow",
                       "--name=multinode", *tiny(white_dogs, "trainer.max_epochs=2"))
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = ids
    run_dir = tmp_path / "multinode" / job_id
    reports = rank_reports(run_dir, job_id, tasks=2)
    assert sorted(r["slurm_node_id"] for r in reports) == ["0", "1"]
    assert sorted(r["hostname"] for r in reports) == ["n1", "n2"]
    assert [r["node_rank"] for r in reports] == [0, 1] and [r["world_size"] for r in reports] == [2, 2]
    expected = 2 * steps_per_epoch(train_size(run_dir), world_size=2, batch_size=4)
    assert reports[0]["metrics"]["global_step"] == expected


def test_two_nodes_two_tasks_each(slurm, white_dogs, tmp_path):
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--nodes=2", "--gpus=2", "--cpus-per-task=1", "--follow",
                       "--name=n2x2", *tiny(white_dogs, "trainer.max_epochs=1"))
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = ids
    run_dir = tmp_path / "n2x2" / job_id
    reports = rank_reports(run_dir, job_id, tasks=4)
    assert [r["world_size"] for r in reports] == [4] * 4
    assert [(r["node_rank"], r["local_rank"]) for r in reports] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert reports[0]["metrics"]["global_step"] == steps_per_epoch(train_size(run_dir), world_size=4, batch_size=4)


def test_timeout_requeues_and_resumes_without_gaps(slurm, white_dogs, tmp_path):
    # A 1-minute limit with the requeue signal 40 s before it: Slurm signals 20-30 s into each attempt and submitit
    # requeues. Uninterrupted, the training takes longer than that (~50 s on an idle 2-core machine).
    epochs = 150
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=1", "--cpus-per-task=1", "--time=1",
                       "--signal-delay=40", "--max-requeues=20", "--follow", "--name=requeue",
                       *tiny(white_dogs, f"trainer.max_epochs={epochs}", "data.max_per_class=16"), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = ids
    run_dir = tmp_path / "requeue" / job_id
    assert "resumes from" in done.stdout  # the job went through at least one requeue
    per_epoch = steps_per_epoch(train_size(run_dir), world_size=1, batch_size=4)
    target = epochs * per_epoch
    (report,) = rank_reports(run_dir, job_id, tasks=1)
    assert report["metrics"]["global_step"] == target and report["metrics"]["epochs"] == epochs
    assert report["start_step"] > 0 and report["start_step"] % per_epoch == 0  # last attempt began at an epoch end
    attempts = logged_steps(run_dir)
    assert len(attempts) >= 2
    seen = sorted(step for steps in attempts for step in steps)
    assert set(seen) == set(range(target))  # no step missing from the TensorBoard axis...
    for before, after in zip(attempts, attempts[1:]):  # ...and a restart repeats at most one checkpoint interval
        assert max(before) - per_epoch < min(after) <= max(before) + 1
    assert "SLURM_RESTART_COUNT=" in (run_dir / "env").read_text()
    assert sacct_state(slurm, job_id) == "COMPLETED"


def test_sweep_is_one_job_array(slurm, white_dogs, tmp_path):
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("grid:\n  optim.lr: [0.001, 0.003]\n")
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=1", "--cpus-per-task=1", "--follow", "--name=sweep",
                       "--sweep", str(sweep), "--max-parallel=2", *tiny(white_dogs, "trainer.max_epochs=1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]  # one array: A_0, A_1
    lrs = set()
    for job_id in ids:
        run_dir = tmp_path / "sweep" / job_id
        assert_layout(run_dir)
        lrs.add(re.search(r"lr: (\S+)", (run_dir / "config.yaml").read_text()).group(1))
    assert lrs == {"0.001", "0.003"}


def test_dry_run_shows_the_requested_placement(slurm, tmp_path):
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=8", "--nodes=2", "--time=1-02:00:00",
                       "--cpus-per-task=6", "--signal-delay=300", "--partition=gpu", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert not ids
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=6", "--time=1560",
                 "--signal=USR2@300", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in done.stdout, line
    assert not (tmp_path / "gmlp").exists()


def follow_until_epoch(slurm, white_dogs, tmp_path, *flags, epoch: int, max_epochs: int):
    """Start `submit.py --follow` in the background and return (process, job id) once rank 0 finished `epoch`."""
    follower = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "launch/submit.py"), "--output", str(tmp_path), "--mode=gmlp",
         "--cpus-per-task=1", "--follow", *flags, *tiny(white_dogs, f"trainer.max_epochs={max_epochs}")],
        cwd=REPO_ROOT, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in follower.stdout:  # wait until it really trains
        lines.append(line)
        if line.startswith(f"epoch {epoch}/"):
            break
    (job_id,) = re.findall(r"submitted job (\S+)", "".join(lines))
    return follower, job_id


def test_cancel_is_reported_and_the_run_can_be_resumed(slurm, white_dogs, tmp_path):
    follower, job_id = follow_until_epoch(slurm, white_dogs, tmp_path, "--gpus=1", "--name=cancel", epoch=1,
                                          max_epochs=500)
    subprocess.run(["scancel", job_id], env=slurm, check=True)
    rest, _ = follower.communicate(timeout=120)
    assert follower.returncode == 1
    assert re.search(rf"job {job_id} ended CANCELLED", rest), rest
    assert sacct_state(slurm, job_id) == "CANCELLED"

    # A new job continues the cancelled run's directory from its last checkpoint, here for two more epochs.
    run_dir = tmp_path / "cancel" / job_id
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    epochs = saved["epoch"] + 1 + 2
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=1", "--cpus-per-task=1", "--follow", "--name=cancel",
                       f"--resume={job_id}", f"--max-epochs={epochs}")
    assert done.returncode == 0, done.stdout + done.stderr
    (resumed_id,) = ids
    assert resumed_id != job_id and f"run directory {run_dir}\n" in done.stdout
    with open(run_dir / "submitit" / f"{resumed_id}_0_result.pkl", "rb") as handle:
        _, report = pickle.load(handle)
    assert report["start_step"] == saved["global_step"]
    per_epoch = saved["global_step"] // (saved["epoch"] + 1)
    assert report["metrics"]["epochs"] == epochs and report["metrics"]["global_step"] == epochs * per_epoch
    missing, _ = launch(slurm, tmp_path, "--mode=gmlp", "--name=cancel", "--resume=999999")
    assert missing.returncode == 2 and "--resume 999999" in missing.stderr


def task_pid(job_id: str, rank: int) -> int:
    """The PID of one rank's python process of a Slurm job (read from /proc: same host, other namespaces)."""
    for entry in Path("/proc").iterdir():
        try:
            environ = dict(
                item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
            )
            cmdline = (entry / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(rank) and "submitit" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} in job {job_id}")


def test_a_killed_rank_ends_the_job_and_it_resumes(slurm, white_dogs, tmp_path):
    follower, job_id = follow_until_epoch(slurm, white_dogs, tmp_path, "--gpus=2", "--name=killed", epoch=2,
                                          max_epochs=400)
    os.kill(task_pid(job_id, rank=1), 9)
    rest, _ = follower.communicate(timeout=120)  # rank 0 does not wait forever on the dead rank
    assert follower.returncode == 1 and f"job {job_id} ended" in rest, rest
    assert sacct_state(slurm, job_id) == "FAILED"
    run_dir = tmp_path / "killed" / job_id
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=2", "--cpus-per-task=1", "--follow", "--name=killed",
                       f"--resume={job_id}", f"--max-epochs={saved['epoch'] + 2}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert rank_reports(run_dir, ids[0], tasks=2)[0]["start_step"] == saved["global_step"]


def test_scontrol_requeue_restarts_from_the_last_checkpoint(slurm, white_dogs, tmp_path):
    epochs = 30
    follower, job_id = follow_until_epoch(slurm, white_dogs, tmp_path, "--gpus=1", "--name=requeued", epoch=3,
                                          max_epochs=epochs)
    subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True)  # what an admin or a preemption does
    rest, _ = follower.communicate(timeout=300)
    assert follower.returncode == 0, rest
    run_dir = tmp_path / "requeued" / job_id
    (report,) = rank_reports(run_dir, job_id, tasks=1)
    per_epoch = steps_per_epoch(train_size(run_dir), world_size=1, batch_size=4)
    assert report["start_step"] > 0 and report["start_step"] % per_epoch == 0  # the rerun resumed at an epoch end
    assert report["metrics"]["global_step"] == epochs * per_epoch
    assert sacct_state(slurm, job_id) == "COMPLETED"


def test_sbatch_template_writes_the_same_layout(slurm, white_dogs, tmp_path):
    env = {**slurm, "DOGCLF_OUTPUT": str(tmp_path)}
    done = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--chdir={tmp_path}", "--ntasks-per-node=2", "--gpus-per-node=2",
         "--cpus-per-task=1", str(REPO_ROOT / "slurm/train.sbatch"), "--name=sbatch", "--max-epochs=1",
         *tiny(white_dogs)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    job_id = done.stdout.strip().split(";")[0]
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert done.returncode == 0, log
    run_dir = tmp_path / "sbatch" / job_id
    assert_layout(run_dir)
    assert "world_size=2" in (run_dir / "env").read_text()
    assert "| Architecture |" in log


def test_local_cluster_runs_two_processes(slurm, white_dogs, tmp_path):
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--gpus=2", "--cluster=local", "--name=local",
                       *tiny(white_dogs, "trainer.max_epochs=1"))
    assert done.returncode == 0, done.stdout + done.stderr
    (job_id,) = ids
    run_dir = tmp_path / "local" / job_id
    assert_layout(run_dir)
    assert [r["world_size"] for r in rank_reports(run_dir, job_id, tasks=2)] == [2, 2]


def test_local_sweep_runs_one_job_after_another(slurm, white_dogs, tmp_path):
    sweep = tmp_path / "seeds.yaml"
    sweep.write_text("grid:\n  trainer.seed: [0, 1]\n")
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", "--cluster=local", "--name=localsweep", "--sweep", str(sweep),
                       *tiny(white_dogs, "trainer.max_epochs=1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(set(ids)) == 2
    seeds = {yaml_seed(tmp_path / "localsweep" / job_id / "config.yaml") for job_id in ids}
    assert seeds == {0, 1}
    assert sorted(p.name for p in (tmp_path / "localsweep").iterdir()) == sorted(ids)  # no leftover placeholder


def yaml_seed(path: Path) -> int:
    return int(re.search(r"seed: (\d+)", path.read_text()).group(1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus=0"], "--gpus 0: a job needs at least one GPU"),
        (["--nodes=0"], "--nodes 0: the number of nodes must be at least 1"),
        (["--time=soon"], "--time 'soon' is not a time limit"),
        (["--sweep=jobs/sweeps/nope.yaml"], "sweep file jobs/sweeps/nope.yaml does not exist"),
        (["--sweep={bad_sweep}"], "optim.nope: unknown key"),
        (["--output={file}/runs"], "cannot be written"),
        (["--set", "optim.lr=fast"], "optim.lr"),
        (["--gpus=8"], "Slurm cannot run this request"),  # the test nodes have 4 GPUs each
        (["--nodes=3"], "Slurm cannot run this request"),
        (["--partition=nope"], "Slurm cannot run this request (allocation failure: Invalid partition name"),
    ],
)
def test_bad_requests_fail_before_submitting(slurm, tmp_path, args, message):
    bad_sweep = tmp_path / "bad.yaml"
    bad_sweep.write_text("grid:\n  optim.nope: [1, 2]\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    args = [a.format(bad_sweep=bad_sweep, file=a_file) for a in args]
    before = slurm_job_count(slurm)
    done, ids = launch(slurm, tmp_path, "--mode=gmlp", *args)
    assert done.returncode == 2 and not ids
    assert message in done.stderr and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert slurm_job_count(slurm) == before


def test_job_module_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-m", "dogclf.job"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "inside an sbatch script" in done.stderr
