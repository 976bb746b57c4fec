"""Plot validation BLEU against training minutes for one or more translation runs.

    python training/plot_translation_curve.py runs/multi30k-nvc runs/multi30k-none --output docs/translation_bleu_curve.png

Each run folder must contain the `results.json` written by `train_translation.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="Run folders with results.json.")
    parser.add_argument("--output", required=True, help="PNG file to write.")
    args = parser.parse_args(argv)

    figure, axes = plt.subplots(figsize=(6, 4))
    for run in args.runs:
        results_file = Path(run) / "results.json"
        if not results_file.exists():
            raise FileNotFoundError(f"{results_file} not found; pass folders written by train_translation.py.")
        history = json.loads(results_file.read_text())["validation"]
        minutes = [entry["train_minutes"] for entry in history]
        bleu = [entry["validation_bleu"] for entry in history]
        axes.plot(minutes, bleu, marker="o", label=Path(run).name)
    axes.set_xlabel("training minutes (evaluation excluded)")
    axes.set_ylabel("validation BLEU (greedy)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()
