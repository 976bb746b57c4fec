"""Measure the NVC overhead: train-step time of the image model with NVC divided by the same network without it.

Both models train on the same real MNIST batches in one process, alternating step by step, so that load from other
programs affects both alike. Prints one JSON line per setting:

    python training/benchmark_step_time.py --num_anchors 10 30 100 300 --steps 60
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nvc_hf import NVCForImageClassification, NVCVisionConfig
from nvc_hf.data import load_mnist


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pixel_values, labels) -> float:
    started = time.perf_counter()
    outputs = model(pixel_values=pixel_values, labels=labels)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    bottleneck = model.bottleneck
    if bottleneck.has_anchors:
        bottleneck.update_anchors(optimizer)
    return time.perf_counter() - started


def measure(num_anchors: int, batch_size: int, steps: int, warmup: int, images, labels) -> dict:
    torch.manual_seed(0)
    models = {
        # Anchors initialised from the first batch, so every timed step runs all NVC losses.
        "nvc": NVCForImageClassification(NVCVisionConfig(num_anchors=num_anchors, anchor_warmup_steps=0)),
        "none": NVCForImageClassification(NVCVisionConfig(bottleneck_type="none")),
    }
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in models.items()}
    timings = {name: [] for name in models}

    for step in range(warmup + steps):
        index = torch.randint(0, images.shape[0], (batch_size,))
        batch = (images[index], labels[index])
        order = list(models) if step % 2 == 0 else list(reversed(models))
        for name in order:
            seconds = train_step(models[name], optimizers[name], *batch)
            if step >= warmup:
                timings[name].append(seconds)

    nvc, none = statistics.median(timings["nvc"]), statistics.median(timings["none"])
    return {
        "num_anchors": num_anchors,
        "batch_size": batch_size,
        "steps": steps,
        "median_step_seconds_nvc": round(nvc, 5),
        "median_step_seconds_none": round(none, 5),
        "overhead_ratio": round(nvc / none, 4),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_anchors", type=int, nargs="+", default=[30], help="Anchor counts to measure.")
    parser.add_argument("--batch_size", type=int, default=128, help="Training batch size.")
    parser.add_argument("--steps", type=int, default=60, help="Timed steps per model.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps per model before timing.")
    args = parser.parse_args()

    images, labels = load_mnist(REPOSITORY_ROOT / "data" / "mnist", "train")
    pixel_values = torch.from_numpy(images[:20000, None]).float() / 255.0
    targets = torch.from_numpy(labels[:20000]).long()
    for num_anchors in args.num_anchors:
        print(json.dumps(measure(num_anchors, args.batch_size, args.steps, args.warmup, pixel_values, targets)))


if __name__ == "__main__":
    main()
