"""Submit a dogclf training job to Slurm through submitit (Lightning DDP, one task per GPU), or run the same job
locally.

    python launch/submit.py --mode=gmlp --gpus=8 --nodes=2 --time=4:00:00 --partition=gpu
    python launch/submit.py --mode=gmlp --gpus=2 --follow --set trainer.max_epochs=5
    python launch/submit.py --mode=gmlp --gpus=1 --sweep jobs/sweeps/imbalance.yaml --max-parallel 4
    python launch/submit.py --mode=gmlp --gpus=8 --nodes=2 --dry-run

Every task runs `dogclf.job.TrainingJob`, which resumes from `<output>/<name>/<job id>/checkpoints/last.ckpt`
after a requeue (timeout or preemption: submitit requeues on SIGUSR2, `--signal-delay` seconds before the limit).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import submitit
import yaml

from dogclf.cli import add_train_arguments, overrides_from_args, run
from dogclf.config import ConfigError, JobConfig, config_from_dict, load_job, writable_dir
from dogclf.job import TrainingJob
from dogclf.sweep import load_sweep, sweep_jobs

TIME_FORMATS = "minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit dogclf training (Lightning DDP, one task per GPU) to Slurm through submitit, or run it "
        "locally. The run directory is <output>/<name>/<job id>; a requeued job resumes from its last checkpoint.",
    )
    add_train_arguments(parser, cluster=True)
    slurm = parser.add_argument_group("placement and Slurm resources")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per node = tasks (ranks) per node (default 1)")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--qos", help="Slurm quality of service")
    slurm.add_argument("--constraint", help="Slurm node constraint, e.g. a100")
    slurm.add_argument("--time", default="60", help=f"time limit per attempt: {TIME_FORMATS} (default 60)")
    slurm.add_argument("--mem", help="memory per node in Slurm syntax, e.g. 64G (default: the partition's)")
    slurm.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per task (default 4)")
    slurm.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="SECONDS",
        help="send the requeue signal (USR2) this long before the time limit (default 120)",
    )
    slurm.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="how many times a job that hits its time limit is requeued (default 10; preemptions are always requeued)",
    )
    slurm.add_argument(
        "--cluster",
        choices=("auto", "slurm", "local", "debug"),
        default="auto",
        help="auto: Slurm if sbatch is on PATH, else local; local: submitit's LocalExecutor on this "
        "machine (--gpus processes, waits for them); debug: one task in this process",
    )
    launch = parser.add_argument_group("launching")
    launch.add_argument("--sweep", metavar="YAML", help="submit one job array, one task per point of this sweep file")
    launch.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="continue the run directory <output>/<name>/JOB_ID of an "
        "earlier job (cancelled, failed, or to train longer with --max-epochs) in a new job; its saved "
        "config.yaml is used, with --set overrides on top",
    )
    launch.add_argument("--max-parallel", type=int, help="run at most this many array tasks at once (sweeps)")
    launch.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script that would be submitted; submit nothing"
    )
    launch.add_argument("--follow", action="store_true", help="wait for the job, streaming rank 0's log")
    return parser


def parse_time(text: str) -> int:
    """Slurm time limit -> whole minutes (seconds round up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
    if text.isdigit():
        minutes = int(text)
    elif match:
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        minutes = days * 1440 + hours * 60 + mins + (secs > 0)
    else:
        raise ConfigError(f"--time {text!r} is not a time limit: use {TIME_FORMATS}")
    if minutes < 1:
        raise ConfigError(f"--time {text!r} is shorter than a minute: give at least 1")
    return minutes


def check_request(args: argparse.Namespace, cluster: str) -> int:
    """Reject impossible requests before anything is submitted; returns the time limit in minutes."""
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: a job needs at least one GPU (one task) per node; use --gpus 1 or more")
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: the number of nodes must be at least 1")
    if args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
    if args.max_requeues < 0:
        raise ConfigError(f"--max-requeues {args.max_requeues}: must be 0 or more")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max-parallel {args.max_parallel}: must be at least 1")
    if args.mem is not None and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        raise ConfigError(f"--mem {args.mem!r} is not a Slurm memory size: use e.g. 64G or 64000M")
    minutes = parse_time(args.time)
    if not 0 <= args.signal_delay < minutes * 60:
        raise ConfigError(f"--signal-delay {args.signal_delay} s must be shorter than the time limit ({minutes} min)")
    if cluster == "local" and args.nodes != 1:
        raise ConfigError("--cluster local runs on this machine only: use --nodes 1 (or submit to Slurm)")
    if cluster == "debug" and (args.nodes, args.gpus) != (1, 1):
        raise ConfigError("--cluster debug runs one task in this process: use --nodes 1 --gpus 1")
    return minutes


def resolve_cluster(requested: str, dry_run: bool) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") or dry_run else "local"
    if requested == "slurm" and not dry_run and not shutil.which("sbatch"):
        raise ConfigError("--cluster slurm: sbatch is not on PATH; run on a Slurm login node, or use --cluster local")
    return requested


def job_configs(args: argparse.Namespace) -> list[JobConfig]:
    """The job(s) to run, with output and data paths made absolute (tasks may start in another directory)."""
    overrides = overrides_from_args(args)
    if args.resume:
        if args.sweep:
            raise ConfigError("--resume continues one run: it cannot be combined with --sweep")
        spec = load_job(args.mode, overrides)
        saved = Path(spec.output).expanduser().resolve() / spec.name / args.resume / "config.yaml"
        if not saved.is_file():
            raise ConfigError(
                f"--resume {args.resume}: {saved} does not exist; give the job id of a run directory "
                f"under {saved.parent.parent} (and the same --name/--output as that run)"
            )
        jobs = [config_from_dict(yaml.safe_load(saved.read_text()), overrides)]
    elif args.sweep:
        jobs = sweep_jobs(args.mode, overrides, load_sweep(args.sweep))
    else:
        jobs = [load_job(args.mode, overrides)]
    absolute = []
    for cfg in jobs:
        data = replace(cfg.data, root=str(Path(cfg.data.root).expanduser().resolve()))
        absolute.append(replace(cfg, output=str(Path(cfg.output).expanduser().resolve()), data=data))
    return absolute


def prepare_output(cfg: JobConfig) -> Path:
    """`<output>/<name>`, created and checked writable before anything is submitted."""
    root = writable_dir(Path(cfg.output) / cfg.name, "pass --output DIR on writable shared storage (or DOGCLF_OUTPUT)")
    if not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data root {cfg.data.root} does not exist: pass --data DIR (one sub-folder per class)")
    return root


def slurm_parameters(args: argparse.Namespace, minutes: int) -> dict:
    """submitit SlurmExecutor parameters: one task per GPU, requeue signal `--signal-delay` s before the limit."""
    resources = {
        "partition": args.partition,
        "account": args.account,
        "qos": args.qos,
        "constraint": args.constraint,
        "mem": args.mem,
        "array_parallelism": args.max_parallel,
    }
    return dict(
        job_name=f"dogclf-{args.name or Path(args.mode).stem}",
        nodes=args.nodes,
        ntasks_per_node=args.gpus,
        gpus_per_node=args.gpus,
        cpus_per_task=args.cpus_per_task,
        time=minutes,
        signal_delay_s=args.signal_delay,
        stderr_to_stdout=True,
        srun_args=["--kill-on-bad-exit=1"],  # one rank dying ends the job instead of leaving the others blocked
        **{key: value for key, value in resources.items() if value is not None},
    )


def check_with_slurm(params: dict) -> None:
    """Ask Slurm whether it could ever run this request (`sbatch --test-only`, nothing is queued): an impossible
    one (more GPUs or nodes than the partition has, a wrong partition or account) would otherwise pend forever."""
    flags = {
        "nodes": params["nodes"],
        "ntasks-per-node": params["ntasks_per_node"],
        "gpus-per-node": params["gpus_per_node"],
        "cpus-per-task": params["cpus_per_task"],
        "time": params["time"],
        **{key: params.get(key) for key in ("partition", "account", "qos", "constraint", "mem")},
    }
    command = ["sbatch", "--test-only", *(f"--{k}={v}" for k, v in flags.items() if v is not None), "--wrap", "true"]
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ConfigError("sbatch --test-only did not answer within 60 s: is slurmctld reachable?") from None
    if answer.returncode != 0:
        reason = (answer.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ConfigError(
            f"Slurm cannot run this request ({reason}): compare --nodes/--gpus/--cpus-per-task/--mem "
            "and the partition with `sinfo -o '%P %D %c %m %G'`"
        )


def build_executor(args: argparse.Namespace, cluster: str, folder: Path, minutes: int) -> submitit.Executor:
    """The submitit executor for the request: Slurm (one task per GPU), local processes, or in-process debug."""
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(
            timeout_min=minutes, tasks_per_node=args.gpus, gpus_per_node=args.gpus, signal_delay_s=args.signal_delay
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args, minutes))
    return executor


def sbatch_script(params: dict, folder: Path, array_size: int) -> str:
    """The batch script that submitit hands to sbatch for these parameters (needs no Slurm on this machine)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    if array_size > 1:
        params = {**params, "map_count": array_size}
    return submitit.slurm.slurm._make_sbatch_string(command=command, folder=folder, **params)


def submit(args: argparse.Namespace) -> int:
    cluster = resolve_cluster(args.cluster, args.dry_run)
    minutes = check_request(args, cluster)
    jobs = job_configs(args)
    name_root = Path(jobs[0].output) / jobs[0].name
    folder = name_root / (args.resume or "%j") / "submitit"
    if args.dry_run:
        if cluster != "slurm":
            raise ConfigError(f"--dry-run shows the sbatch script of a Slurm job; --cluster {cluster} submits none")
        print(sbatch_script(slurm_parameters(args, minutes), folder, len(jobs)))
        print(f"# {len(jobs)} run(s) -> {name_root}/<job id>  (dry run: nothing submitted)")
        return 0

    prepare_output(jobs[0])
    if cluster != "slurm":
        return run_here(args, cluster, jobs, folder, minutes)
    check_with_slurm(slurm_parameters(args, minutes))
    executor = build_executor(args, cluster, folder, minutes)
    start = time.time()
    if len(jobs) == 1:
        submitted = [executor.submit(TrainingJob(jobs[0], run_id=args.resume))]
    else:
        with executor.batch():
            submitted = [executor.submit(TrainingJob(cfg)) for cfg in jobs]
    announce(submitted, cluster, name_root, args.resume)
    return follow(submitted, start) if args.follow else 0


def run_here(args: argparse.Namespace, cluster: str, jobs: list[JobConfig], folder: Path, minutes: int) -> int:
    """--cluster local / debug: the jobs run on this machine, one after another (a sweep runs sequentially), and
    this process waits for each (submitit cancels local jobs whose launcher exits)."""
    failed = 0
    for cfg in jobs:
        if cluster == "local":  # submitit's local controller creates the unformatted `%j/submitit` (not its parents)
            folder.parent.mkdir(exist_ok=True)
        start = time.time()
        job = build_executor(args, cluster, folder, minutes).submit(TrainingJob(cfg, run_id=args.resume))
        announce([job], cluster, folder.parent.parent, args.resume)
        failed += (report([job]) if cluster == "debug" else follow([job], start)) != 0
        for placeholder in (folder, folder.parent):  # empty unless it was a real run directory (--resume)
            with contextlib.suppress(OSError):
                placeholder.rmdir()
    return 1 if failed else 0


def announce(jobs: list[submitit.Job], cluster: str, name_root: Path, resume: str | None) -> None:
    for job in jobs:
        print(f"submitted job {job.job_id} ({cluster}): run directory {name_root / (resume or str(job.job_id))}")
        print(f"  log (rank 0): {job.paths.stdout}")
    print(f"watch it with: tensorboard --logdir {name_root}", flush=True)


def follow(jobs: list[submitit.Job], start: float) -> int:
    """Stream rank 0's log of every job until all have ended; report the result of each."""
    offsets = {job.job_id: 0 for job in jobs}
    first_step_seen = False
    try:
        while True:
            finished = all(job.done() for job in jobs)  # read before the logs: nothing written after is lost
            for job in jobs:
                text = _new_log_text(job, offsets)
                if text:
                    prefix = f"[{job.job_id}] " if len(jobs) > 1 else ""
                    for line in text.splitlines():
                        print(prefix + line, flush=True)
                        if not first_step_seen and line.startswith("epoch 1/"):
                            first_step_seen = True
                            print(f"{prefix}(first epoch done {time.time() - start:.1f} s after submission)")
            if finished:
                break
            time.sleep(1)
    except KeyboardInterrupt:
        ids = " ".join(str(job.job_id) for job in jobs)
        print(f"\nstopped following; the job(s) keep running (cancel with: scancel {ids})", file=sys.stderr)
        return 130
    return report(jobs)


ACTIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "UNKNOWN")


def final_state(job: submitit.Job, grace_s: float = 30) -> str:
    """Slurm's verdict on a job whose results are in: accounting may still say RUNNING for a few seconds."""
    deadline = time.time() + grace_s
    state = job.state
    while isinstance(job, submitit.SlurmJob) and state.startswith(ACTIVE_STATES) and time.time() < deadline:
        time.sleep(1)
        state = job.watcher.get_state(job.job_id, mode="force")
    return state


def report(jobs: list[submitit.Job]) -> int:
    """One line per job: its final state and rank 0's numbers, or why it did not finish. Non-zero if any failed."""
    failed = 0
    for job in jobs:
        state = final_state(job)
        try:
            reports = job.results()
        except Exception as err:  # the job's own exception or Slurm's verdict (cancelled, out of time...)
            print(f"job {job.job_id} ended {state}: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
            failed += 1
            continue
        metrics = next(r["metrics"] for r in reports if r.get("global_rank", 0) == 0)
        print(
            f"job {job.job_id} {state}: {metrics['epochs']} epochs, step {metrics['global_step']}, test balanced "
            f"accuracy {metrics['test_balanced_accuracy']:.3f} -> {metrics['run_dir']}"
        )
    return 1 if failed else 0


def _new_log_text(job: submitit.Job, offsets: dict) -> str:
    path = job.paths.stdout
    if not path.exists():
        return ""
    size = path.stat().st_size
    if size < offsets[job.job_id]:  # a requeued attempt starts a new log
        offsets[job.job_id] = 0
    with path.open("rb") as handle:
        handle.seek(offsets[job.job_id])
        data = handle.read()
    offsets[job.job_id] += len(data)
    return data.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(submit, args)


if __name__ == "__main__":
    sys.exit(main())
