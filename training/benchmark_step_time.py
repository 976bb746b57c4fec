"""Measure the NVC overhead: train-step time of a head with NVC divided by the same network without it.

Both models train on the same real batches in one process, alternating step by step, so that load from other
programs affects both alike. Prints one JSON line per head and anchor count, with a 95% bootstrap interval of
the ratio:

    python training/benchmark_step_time.py --head image point text --num_anchors 10 30 100 300 --steps 60

Batches: MNIST, 128 images; ModelNet10 (the subset in data/), 32 clouds of 1,024 points; Multi30k, 64 sentence
pairs with an 8k joint BPE vocabulary (about 1,000 target tokens). Each model uses its head's default config apart
from `bottleneck_type` and `num_anchors`, with the anchors set from the first batch so that every timed step runs
all NVC losses.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

from nvc_hf import (
    NVCForConditionalGeneration,
    NVCForImageClassification,
    NVCForPointCloudClassification,
    NVCPointConfig,
    NVCTextConfig,
    NVCVisionConfig,
)
from nvc_hf.data import load_mnist
from nvc_hf.data.parallel_text import load_multi30k
from nvc_hf.data.pointclouds import load_modelnet_splits
from nvc_hf.data.subword import train_joint_tokenizer


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DATA = REPOSITORY_ROOT / "data"


def image_head(num_anchors: int, bottleneck_type: str) -> torch.nn.Module:
    return NVCForImageClassification(
        NVCVisionConfig(bottleneck_type=bottleneck_type, num_anchors=num_anchors, anchor_warmup_steps=0)
    )


def image_batches() -> Callable[[], dict]:
    images, labels = load_mnist(DATA / "mnist", "train")
    pixel_values = torch.from_numpy(images[:20000, None]).float() / 255.0
    targets = torch.from_numpy(labels[:20000]).long()

    def sample() -> dict:
        index = torch.randint(0, pixel_values.shape[0], (128,))
        return {"pixel_values": pixel_values[index], "labels": targets[index]}

    return sample


def point_head(num_anchors: int, bottleneck_type: str) -> torch.nn.Module:
    return NVCForPointCloudClassification(
        NVCPointConfig(bottleneck_type=bottleneck_type, num_anchors=num_anchors, anchor_warmup_steps=0, num_labels=10)
    )


def point_batches() -> Callable[[], dict]:
    clouds, labels = load_modelnet_splits(DATA / "modelnet10" / "ModelNet10_pcd_subset.tar.gz")["train"]
    clouds, labels = torch.as_tensor(clouds).float(), torch.as_tensor(labels).long()

    def sample() -> dict:
        index = torch.randint(0, clouds.shape[0], (32,))
        return {"points": clouds[index], "labels": labels[index]}

    return sample


class TextSetup:
    """The tokenizer is trained once and shared by the batches and the model configs."""

    def __init__(self):
        splits = load_multi30k(DATA / "multi30k")
        sources, targets = splits["train"]
        self.tokenizer = train_joint_tokenizer(sources + targets, vocab_size=8000)
        self.sources, self.targets = sources[:20000], targets[:20000]

    def head(self, num_anchors: int, bottleneck_type: str) -> torch.nn.Module:
        tokenizer = self.tokenizer
        config = NVCTextConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.bos_token_id,
            bottleneck_type=bottleneck_type,
            num_anchors=num_anchors,
            anchor_warmup_steps=0,
        )
        return NVCForConditionalGeneration(config)

    def batches(self) -> Callable[[], dict]:
        def sample() -> dict:
            index = torch.randint(0, len(self.sources), (64,)).tolist()
            encoded = self.tokenizer(
                [self.sources[i] for i in index],
                text_target=[self.targets[i] for i in index],
                padding=True,
                return_tensors="pt",
            )
            labels = encoded["labels"].masked_fill(encoded["labels"] == self.tokenizer.pad_token_id, -100)
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}

        return sample


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    started = time.perf_counter()
    outputs = model(**batch)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    bottleneck = model.bottleneck
    if bottleneck.has_anchors:
        bottleneck.update_anchors(optimizer)
    return time.perf_counter() - started


def ratio_interval(nvc_seconds: list[float], none_seconds: list[float]) -> tuple[float, float]:
    """95% bootstrap interval of the ratio of median step times.

    Steps are resampled in pairs (the NVC step and the no-NVC step on the same batch), so load that slowed
    both models at once stays paired.
    """

    def ratio_of_medians(nvc: np.ndarray, none: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(nvc, axis=axis) / np.median(none, axis=axis)

    result = bootstrap(
        (np.asarray(nvc_seconds), np.asarray(none_seconds)),
        ratio_of_medians,
        paired=True,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def measure(head: str, build: Callable, sample: Callable, num_anchors: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    models = {"nvc": build(num_anchors, "nvc"), "none": build(num_anchors, "none")}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    timings = {name: [] for name in models}

    for step in range(warmup + steps):
        batch = sample()
        order = list(models) if step % 2 == 0 else list(reversed(models))
        for name in order:
            seconds = train_step(models[name], optimizers[name], batch)
            if step >= warmup:
                timings[name].append(seconds)

    nvc, none = statistics.median(timings["nvc"]), statistics.median(timings["none"])
    low, high = ratio_interval(timings["nvc"], timings["none"])
    return {
        "head": head,
        "num_anchors": num_anchors,
        "latent_size": models["nvc"].config.latent_size,
        "steps": steps,
        "median_step_seconds_nvc": round(nvc, 5),
        "median_step_seconds_none": round(none, 5),
        "overhead_ratio": round(nvc / none, 4),
        "overhead_ratio_ci95": [round(low, 4), round(high, 4)],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", nargs="+", default=["image"], choices=["image", "point", "text"])
    parser.add_argument("--num_anchors", type=int, nargs="+", default=[30], help="Anchor counts to measure.")
    parser.add_argument("--steps", type=int, default=60, help="Timed steps per model.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps per model before timing.")
    args = parser.parse_args(argv)

    results = []
    for head in args.head:
        if head == "image":
            build, sample = image_head, image_batches()
        elif head == "point":
            build, sample = point_head, point_batches()
        else:
            setup = TextSetup()
            build, sample = setup.head, setup.batches()
        for num_anchors in args.num_anchors:
            results.append(measure(head, build, sample, num_anchors, args.steps, args.warmup))
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
