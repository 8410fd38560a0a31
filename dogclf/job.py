"""The cluster job: one training run as a checkpointable callable that every task of a Slurm (or local) job runs.

submitit pickles `TrainingJob` by reference to this installed module and calls it once per task; Lightning
reads the ranks from the environment. Requeue belongs to submitit alone: Lightning's `SLURMEnvironment` runs
with `auto_requeue=False`. A (re)started job never trusts a path from submit time: it resumes from the newest
`checkpoints/last.ckpt` in its run directory, which is `<output>/<name>/<job id>` (job id `A_i` for array tasks).

`python -m dogclf.job` is the same job for plain `sbatch` scripts (see `slurm/train.sbatch`): ranks and the run
directory come from the SLURM_* variables instead of submitit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit  # nothing heavier at import: submitit installs its requeue handler only after unpickling the job

from dogclf.config import ConfigError, JobConfig


@dataclass(frozen=True)
class Placement:
    """Where one job runs: the run id (names the run directory; the job id unless resuming another job's run),
    nodes, tasks per node, and who launched the tasks."""

    run_id: str
    num_nodes: int
    tasks_per_node: int
    launcher: str  # "slurm" (srun started every task) or "local" (submitit's LocalExecutor / DebugExecutor)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.tasks_per_node


def run_dir_of(cfg: JobConfig, run_id: str) -> Path:
    return Path(cfg.output).expanduser().resolve() / cfg.name / run_id


def run(cfg: JobConfig, placement: Placement) -> dict[str, Any]:
    """Train `cfg` with DDP over the placement's tasks; returns what this rank saw (see `RankRecorder`)."""
    from pytorch_lightning.plugins.environments import LightningEnvironment, SLURMEnvironment

    from dogclf.callbacks import KeepClusterSignals, RankRecorder
    from dogclf.train import train

    if placement.launcher == "slurm":
        environment = SLURMEnvironment(auto_requeue=False)  # submitit (or the user's sbatch) owns requeue
    else:
        # LocalExecutor starts the processes: export RANK, WORLD_SIZE, MASTER_ADDR/PORT... so that Lightning treats
        # them as launched externally. Keep all GPUs visible: Lightning picks `cuda:<local rank>` itself.
        if placement.world_size > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        environment = LightningEnvironment()
    cfg = replace(cfg, trainer=replace(cfg.trainer, devices=placement.tasks_per_node))
    recorder = RankRecorder()
    metrics = train(
        cfg,
        run_dir=run_dir_of(cfg, placement.run_id),
        num_nodes=placement.num_nodes,
        strategy="ddp" if placement.world_size > 1 else "auto",
        plugins=[environment],
        callbacks=[recorder, KeepClusterSignals()],
        progress_bar=False,
    )
    return {**recorder.report, "metrics": metrics}


class TrainingJob(submitit.helpers.Checkpointable):
    """What `launch/submit.py` submits: `TrainingJob(cfg)()` trains `cfg` on the tasks of the current job in
    `<output>/<name>/<job id>`; `TrainingJob(cfg, run_id)` continues the run directory of an earlier job."""

    def __init__(self, cfg: JobConfig, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        launcher = "slurm" if env.cluster == "slurm" else "local"
        run_id = self.run_id or str(env.job_id)
        placement = Placement(run_id, env.num_nodes, env.num_tasks // env.num_nodes, launcher)
        result = run(self.cfg, placement)
        # Finished: a requeue signal that arrives now (the time limit was near) must neither requeue the job nor
        # kill the process while submitit writes the result (Slurm would then call the job FAILED).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return result

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on global rank 0 when the requeue signal (timeout or preemption) arrives.

        Checkpoints are written atomically at every epoch end (tmp file + fsync + rename), so `last.ckpt` on disk
        is always whole; saving here instead would wait on a barrier the other ranks never reach. The new attempt
        is a fresh `TrainingJob(cfg)` that finds the newest checkpoint itself, as a node-failure requeue does.
        """
        # Stdlib only: this runs inside a signal handler, possibly while the main thread is importing torch.
        run_id = self.run_id or str(submitit.JobEnvironment().job_id)
        last = run_dir_of(self.cfg, run_id) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            print("requeue: no checkpoint yet, the next attempt starts from the beginning", flush=True)
        else:
            age = time.time() - last.stat().st_mtime
            print(f"requeue: the next attempt resumes from {last} (written {age:.0f} s ago)", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg, self.run_id))


def slurm_placement(environ: Mapping[str, str]) -> Placement:
    """The placement of the Slurm job step this task belongs to (`srun` in an sbatch script)."""
    run_id = environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in environ:
        run_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    nodes = int(environ["SLURM_JOB_NUM_NODES"])
    return Placement(run_id, nodes, int(environ["SLURM_NTASKS"]) // nodes, "slurm")


def main(argv: list[str] | None = None) -> int:
    from dogclf.cli import add_train_arguments, job_from_args, print_results
    from dogclf.cli import run as run_command

    parser = argparse.ArgumentParser(
        prog="python -m dogclf.job",
        description="Train on every task of a Slurm job step (`srun python -m dogclf.job ...` in an sbatch script, "
        "see slurm/train.sbatch): the submitit job without submitit. Run directory <output>/<name>/<job id>.",
    )
    add_train_arguments(parser, cluster=True)

    def handler(args: argparse.Namespace) -> int:
        if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
            raise ConfigError("python -m dogclf.job runs on the tasks of a Slurm job: `srun python -m dogclf.job ...` "
                              "inside an sbatch script (locally use python app.py)")
        result = run(job_from_args(args), slurm_placement(os.environ))
        if result.get("global_rank", 0) == 0:
            print_results(result["metrics"])
        return 0

    return run_command(handler, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
