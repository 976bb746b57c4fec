"""Turn the ablation records of `training/ablate.py` into `docs/RESULTS.md` with tables and plots.

    python training/report.py --results_dir results/ablations --output docs/RESULTS.md

For every task it writes a table of mean and standard deviation over seeds per variant. A second table gives the
difference of each variant to (a), the network without NVC, with a 95% paired t interval over the seeds both
share. Plots: the validation curves, and the latent plots of (a) and (c) where the runs drew them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import TASKS, VARIANTS  # noqa: E402


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]

# Metrics where a smaller value is better; all others are better when larger.
LOWER_IS_BETTER = {"reconstruction_chamfer", "completion_chamfer"}

METRIC_NAMES = {
    "accuracy": "accuracy",
    "mean_class_accuracy": "mean-class accuracy",
    "anchor_cluster_accuracy": "anchor ACC",
    "anchor_nmi": "anchor NMI",
    "anchor_ari": "anchor ARI",
    "kmeans_cluster_accuracy": "k-means ACC",
    "kmeans_nmi": "k-means NMI",
    "kmeans_ari": "k-means ARI",
    "reconstruction_chamfer": "Chamfer (reconstruction)",
    "completion_chamfer": "Chamfer (completion)",
    "bleu": "BLEU",
    "chrf": "chrF",
}


def load_records(results_dir: Path) -> dict[str, list[dict]]:
    """Records grouped by task, read from `<results_dir>/<task>/*.json`."""
    records = defaultdict(list)
    for path in sorted(results_dir.glob("*/*.json")):
        record = json.loads(path.read_text())
        missing = {"task", "variant", "seed", "metrics", "validation"} - record.keys()
        if missing:
            raise ValueError(f"{path} is not an ablation record (missing {sorted(missing)}); remove it or rerun it.")
        record["path"] = path
        records[record["task"]].append(record)
    if not records:
        raise FileNotFoundError(f"No ablation records in {results_dir}; run training/ablate.py first.")
    return records


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_difference(variant: dict[int, float], baseline: dict[int, float]) -> dict:
    """Mean of `variant - baseline` over the seeds both have, with a 95% paired t confidence interval."""
    seeds = sorted(variant.keys() & baseline.keys())
    differences = [variant[seed] - baseline[seed] for seed in seeds]
    if not differences:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None}
    half_width = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"n": len(differences), "mean": mean, "low": mean - half_width, "high": mean + half_width}


def verdict(metric: str, difference: dict) -> str:
    """Say in plain words whether a variant beats (a) on a metric."""
    if difference["low"] is None:
        return "too few shared seeds for an interval"
    better_sign = -1 if metric in LOWER_IS_BETTER else 1
    if difference["low"] > 0 or difference["high"] < 0:
        better = (difference["mean"] > 0) == (better_sign > 0)
        return "better than (a)" if better else "WORSE than (a)"
    return "no difference from (a) shown"


def format_value(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def plot_validation(task: str, records: list[dict], metric: str, path: Path) -> None:
    """Validation curves, one line per variant (mean over seeds at each step)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for variant in sorted({record["variant"] for record in records}):
        curves = defaultdict(list)
        for record in records:
            if record["variant"] == variant:
                for entry in record["validation"]:
                    if metric in entry:
                        curves[entry["step"]].append(entry[metric])
        steps = sorted(curves)
        axis.plot(steps, [statistics.fmean(curves[step]) for step in steps], marker="o", label=f"({variant})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"validation {METRIC_NAMES.get(metric, metric).replace('validation_', '')}")
    axis.set_title(f"{task}: validation curves (mean over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def task_section(task: str, records: list[dict], figures_dir: Path, output: Path) -> list[str]:
    spec = TASKS[task]
    by_variant = defaultdict(dict)
    for record in records:
        by_variant[record["variant"]][record["seed"]] = record
    variants = sorted(by_variant)
    metrics = [metric for metric in spec.metrics if any(metric in record["metrics"] for record in records)]
    first = records[0]
    seeds = sorted({record["seed"] for record in records})
    different = [record["path"].name for record in records if record["budget_arguments"] != first["budget_arguments"]]
    if different:
        raise ValueError(
            f"{', '.join(different)} in {task} used a different budget from {first['path'].name}; the table compares "
            "variants at one budget, so move the records of other budgets to another --results_dir."
        )

    lines = [f"## {task}", ""]
    lines.append(
        f"Command of every run: `python training/{spec.script} --output_dir RUN_DIR --seed SEED VARIANT_ARGUMENTS "
        f"{' '.join(first['budget_arguments'])}`"
    )
    lines.append("")
    lines.append(
        f"Regenerate (skips runs whose record exists; raise `--max_steps` and the rest for a GPU): `python "
        f"training/ablate.py --task {task} --variants {' '.join(variants)} --seeds {' '.join(map(str, seeds))} -- "
        f"{' '.join(first['budget_arguments'])}`"
    )
    lines.append("")
    lines.append(
        f"Hardware: {first['hardware']['processor']} ({first['hardware']['cpu_count']} cores, "
        f"{first['torch_threads']} torch thread(s) per run), GPU: {first['hardware']['gpu'] or 'none'}; "
        f"torch {first['versions']['torch']}, transformers {first['versions']['transformers']}; code at commit(s) "
        + ", ".join(sorted({f"`{(record['git_commit'] or 'unknown')[:10]}`" for record in records}))
        + f"; last run finished {max(r['finished_at'] for r in records)}."
    )
    lines.append("")

    # Mean and standard deviation per variant.
    lines.append(f"Test metrics, mean ± standard deviation over seeds ({', '.join(map(str, seeds))}):")
    lines.append("")
    header = " | ".join(METRIC_NAMES.get(m, m) for m in metrics)
    lines.append(f"| variant | variant arguments | seeds | {header} | wall minutes per run |")
    lines.append("|---|---|---|" + "---|" * len(metrics) + "---|")
    for variant in variants:
        runs = list(by_variant[variant].values())
        cells = []
        for metric in metrics:
            values = [run["metrics"][metric] for run in runs if run["metrics"].get(metric) is not None]
            if not values:
                cells.append("-")
                continue
            mean, std = mean_and_std(values)
            cells.append(format_value(mean) + (f" ± {format_value(std)}" if std is not None else ""))
        minutes = statistics.fmean(run["wall_seconds"] for run in runs) / 60
        arguments = " ".join(VARIANTS[variant][1])
        row = f"| ({variant}) {VARIANTS[variant][0]} | `{arguments}` | {len(runs)} | " + " | ".join(cells)
        lines.append(row + f" | {minutes:.1f} |")
    lines.append("")

    if any(metric.startswith("kmeans_") for metric in metrics):
        lines.append(
            "The k-means columns cluster the test latent means into as many clusters as the variant has anchors, or "
            "into as many as there are classes for variants without anchors; compare them only between variants "
            "with the same number of clusters."
        )
        lines.append("")

    # Paired differences to (a).
    if "a" in by_variant and len(variants) > 1:
        lines.append(
            "Difference to (a), mean over shared seeds [95% paired t interval]; an interval that contains 0 shows no "
            "difference at this number of seeds:"
        )
        lines.append("")
        lines.append("| variant | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        verdicts = []
        for variant in variants:
            if variant == "a":
                continue
            cells = []
            for metric in metrics:
                ours = {s: r["metrics"][metric] for s, r in by_variant[variant].items() if metric in r["metrics"]}
                base = {s: r["metrics"][metric] for s, r in by_variant["a"].items() if metric in r["metrics"]}
                difference = paired_difference(ours, base)
                if difference["mean"] is None:
                    cells.append("-")
                    continue
                interval = (
                    f" [{format_value(difference['low'])}, {format_value(difference['high'])}]"
                    if difference["low"] is not None
                    else ""
                )
                cells.append(f"{difference['mean']:+.4f}{interval}")
                if metric == spec.metrics[0]:
                    sign = -1 if metric in LOWER_IS_BETTER else 1
                    wins = sum((ours[seed] - base[seed]) * sign > 0 for seed in ours.keys() & base.keys())
                    verdicts.append(
                        f"- ({variant}) {VARIANTS[variant][0]}: {METRIC_NAMES[metric]}: {verdict(metric, difference)}; "
                        f"better than (a) in {wins} of {difference['n']} paired seeds."
                    )
            lines.append(f"| ({variant}) | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"On the main metric ({METRIC_NAMES[spec.metrics[0]]}):")
        lines.append("")
        lines.extend(verdicts)
        lines.append("")

    # Plots.
    curve = figures_dir / f"{task}-validation.png"
    plot_validation(task, records, spec.validation_metric, curve)
    lines.append(f"![{task} validation curves per variant]({os.path.relpath(curve, output.parent)})")
    lines.append("")
    for variant in ("a", "c"):
        run = by_variant.get(variant, {}).get(seeds[0])
        plot = run["path"].with_suffix(".png") if run else None
        if plot is not None and plot.exists():
            target = figures_dir / f"{task}-latents-{variant}.png"
            shutil.copyfile(plot, target)
            lines.append(
                f"Test latents of ({variant}), seed {seeds[0]} (PCA; stars are anchors where the variant has them):"
            )
            lines.append("")
            lines.append(f"![{task} latents of variant ({variant})]({os.path.relpath(target, output.parent)})")
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(REPOSITORY_ROOT / "results" / "ablations"))
    parser.add_argument("--output", default=str(REPOSITORY_ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--figures_dir", default=None, help="Default: a `results` folder beside --output.")
    parser.add_argument(
        "--title", default="Ablation results", help="Page heading, to tell apart pages of different budgets."
    )
    args = parser.parse_args(argv)

    output = Path(args.output)
    figures_dir = Path(args.figures_dir) if args.figures_dir else output.parent / "results"
    records = load_records(Path(args.results_dir))

    lines = [
        f"# {args.title}",
        "",
        "Generated by `python training/report.py` from the records that `training/ablate.py` wrote; do not edit by "
        "hand. Variants: "
        + "; ".join(f"({letter}) {description}" for letter, (description, _) in VARIANTS.items())
        + ". All variants of a task share the budget (steps, batch, schedule) and differ only in their NVC "
        "arguments.",
        "",
    ]
    for task in sorted(records):
        lines.extend(task_section(task, records[task], figures_dir, output))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines).rstrip() + "\n")
    print(f"Wrote {output}")
    return output


if __name__ == "__main__":
    main()
