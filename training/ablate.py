"""Run the NVC ablation: every variant of one task for several seeds at an equal budget, one JSON record per run.

    python training/ablate.py --task mnist --seeds 42 7 13 --jobs 2
    python training/ablate.py --task multi30k --variants a c --seeds 42 7 -- --max_steps 3000

The variants differ only in their NVC arguments. All of them get the same budget (steps, batch, schedule): the
task's entry in `TASKS` below, with any training arguments after `--` replacing its values. Each run trains with the task's
script in a subprocess, writes its model folder under `--runs_dir` and its record to
`<results_dir>/<task>/<variant>-seed<seed>.json`. A run whose record exists is skipped, so an interrupted ablation
continues where it stopped when started again with the same command. `training/report.py` turns the records into
`docs/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


TRAINING_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = TRAINING_DIR.parent

# The arguments each variant sets; everything else is the task's default. (e) and (f) keep the default anchor KL prior.
VARIANTS = {
    "a": ("no NVC (deterministic bottleneck)", ["--bottleneck_type", "none"]),
    "b": ("plain VAE (KL to N(0, I), no anchors)", ["--bottleneck_type", "vae"]),
    "c": ("NVC, KL to N(0, I)", ["--bottleneck_type", "nvc", "--kl_prior", "standard"]),
    "d": ("NVC, KL to the nearest anchor", ["--bottleneck_type", "nvc", "--kl_prior", "anchor"]),
    "e": ("NVC without the metric loss", ["--bottleneck_type", "nvc", "--kl_prior", "anchor", "--metric_weight", "0"]),
    "f": ("NVC without the nebula loss", ["--bottleneck_type", "nvc", "--kl_prior", "anchor", "--nebula_weight", "0"]),
}


@dataclass(frozen=True)
class Task:
    """A training script, the budget every variant gets, and the metrics the report shows."""

    script: str
    budget: tuple[str, ...]
    metrics: tuple[str, ...]
    validation_metric: str


TASKS = {
    "mnist": Task(
        script="train_image.py",
        budget=tuple("--max_steps 300 --eval_steps 100 --save_steps 0 --logging_steps 100".split()),
        metrics=(
            "accuracy",
            "anchor_cluster_accuracy",
            "anchor_nmi",
            "anchor_ari",
            "kmeans_cluster_accuracy",
            "kmeans_nmi",
            "kmeans_ari",
        ),
        validation_metric="accuracy",
    ),
    "modelnet10": Task(
        script="train_points.py",
        budget=tuple(
            "--max_steps 800 --per_device_train_batch_size 32 --num_anchors 10 --eval_steps 200 --save_steps 0 "
            "--logging_steps 100".split()
        ),
        metrics=(
            "accuracy",
            "mean_class_accuracy",
            "reconstruction_chamfer",
            "completion_chamfer",
            "anchor_nmi",
            "kmeans_cluster_accuracy",
            "kmeans_nmi",
        ),
        validation_metric="accuracy",
    ),
    "multi30k": Task(
        script="train_translation.py",
        budget=tuple(
            "--max_steps 300 --max_tokens 4096 --mixed_precision bf16 --learning_rate 1e-3 --lr_scheduler_type "
            "inverse_sqrt --warmup_ratio 0.1 --anchor_warmup_ratio 0.1 --eval_steps 100 --max_eval_samples 300 "
            "--per_device_eval_batch_size 100 --test_num_beams 5 --save_steps 0 --logging_steps 50".split()
        ),
        metrics=("bleu", "chrf"),
        validation_metric="validation_bleu",
    ),
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--variants", nargs="+", default=sorted(VARIANTS), help="Variant letters a-f.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 7, 13])
    parser.add_argument("--results_dir", default=str(REPOSITORY_ROOT / "results" / "ablations"))
    parser.add_argument("--runs_dir", default=str(REPOSITORY_ROOT / "runs" / "ablations"))
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Runs at the same time. With more than one, each run gets an equal share of the CPU threads.",
    )
    parser.add_argument(
        "--threads_per_run", type=int, default=None, help="torch threads of each run; default: CPU cores / --jobs."
    )
    args = parser.parse_args(argv)

    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}.")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    if args.threads_per_run is not None and args.threads_per_run < 1:
        parser.error(f"--threads_per_run must be at least 1, got {args.threads_per_run}.")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed; give each seed once.")
    try:
        merge_arguments(TASKS[args.task].budget, extra)
    except ValueError as error:
        parser.error(str(error))
    return args, extra


def merge_arguments(defaults: tuple[str, ...] | list[str], overrides: list[str]) -> list[str]:
    """`--flag value` pairs of `defaults` with those of `overrides` replacing the same flags, in order of first use.

    Variant arguments may not be overridden, since they define what is compared.
    """
    merged: dict[str, list[str]] = {}
    for arguments in (defaults, overrides):
        flag = None
        for argument in arguments:
            if argument.startswith("--"):
                flag = argument
                merged[flag] = []
            elif flag is None:
                raise ValueError(f"Training argument {argument!r} comes before any --flag; write it as --name value.")
            else:
                merged[flag].append(argument)
    fixed = {argument for _, arguments in VARIANTS.values() for argument in arguments if argument.startswith("--")}
    clashing = sorted(fixed & set(merged) - set(defaults))
    if clashing:
        raise ValueError(f"{clashing} after -- would change what the variants compare; leave them to the variants.")
    return [item for flag, values in merged.items() for item in (flag, *values)]


def environment() -> dict:
    """Hardware and library versions, stored in every record."""
    import torch

    processor = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        processor = names[0] if names else processor
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "accelerate", "nvc_hf", "scikit-learn", "sacrebleu", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "hardware": {
            "machine": platform.machine(),
            "processor": processor,
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": versions,
        "git_commit": commit,
    }


def repository_relative(value):
    """Copy nested record values, writing paths inside the repository relative to its root.

    Records are committed with the repository, so they should not carry the layout of the machine that wrote
    them. Paths outside the repository stay as they are.
    """
    if isinstance(value, dict):
        return {key: repository_relative(item) for key, item in value.items()}
    if isinstance(value, list):
        return [repository_relative(item) for item in value]
    if isinstance(value, str) and value.startswith(f"{REPOSITORY_ROOT}{os.sep}"):
        return value[len(str(REPOSITORY_ROOT)) + 1 :]
    return value


def run_one(task_name: str, variant: str, seed: int, args: argparse.Namespace, extra: list[str], env: dict) -> bool:
    """Train one variant with one seed and write its record; returns whether it succeeded."""
    task = TASKS[task_name]
    name = f"{variant}-seed{seed}"
    record_path = Path(args.results_dir) / task_name / f"{name}.json"
    run_dir = Path(args.runs_dir) / task_name / name
    log_path = Path(args.results_dir) / task_name / "logs" / f"{name}.log"
    if record_path.exists():
        print(f"[{task_name}] {name}: record exists, skipped", flush=True)
        return True

    # A run that died part way leaves a folder the training script would refuse; start it again from scratch.
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = merge_arguments(task.budget, extra)
    training_arguments = ["--output_dir", str(run_dir), "--seed", str(seed), "--disable_tqdm", "true"]
    training_arguments += [*VARIANTS[variant][1], *budget]
    command = [sys.executable, str(TRAINING_DIR / task.script), *training_arguments]
    threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // args.jobs)
    process_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    print(f"[{task_name}] {name}: training ({threads} threads)", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=process_env, cwd=REPOSITORY_ROOT)
    wall_seconds = time.perf_counter() - started
    if finished.returncode != 0:
        print(f"[{task_name}] {name}: FAILED with exit code {finished.returncode}; see {log_path}", flush=True)
        return False

    results = json.loads((run_dir / "results.json").read_text())
    record = {
        "task": task_name,
        "variant": variant,
        "variant_description": VARIANTS[variant][0],
        "seed": seed,
        "command": ["python", f"training/{task.script}", *training_arguments],
        "variant_arguments": VARIANTS[variant][1],
        "budget_arguments": budget,
        "training_arguments": json.loads((run_dir / "training_args.json").read_text()),
        "metrics": results["test"],
        "validation": results["validation"],
        "wall_seconds": wall_seconds,
        "torch_threads": threads,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **env,
    }
    latent_plot = run_dir / "latent_space.png"
    if latent_plot.exists():
        shutil.copyfile(latent_plot, record_path.with_suffix(".png"))
    # Write the record last and atomically: its presence is what marks the run as finished.
    record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = record_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(repository_relative(record), indent=2))
    temporary.replace(record_path)
    print(f"[{task_name}] {name}: done in {wall_seconds / 60:.1f} min", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    env = environment()
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        succeeded = list(pool.map(lambda run: run_one(args.task, *run, args, extra, env), runs))
    failed = [f"{variant}-seed{seed}" for (variant, seed), ok in zip(runs, succeeded) if not ok]
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"All {len(runs)} runs have records in {Path(args.results_dir) / args.task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
