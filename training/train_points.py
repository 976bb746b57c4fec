"""Train an NVC point-cloud model with Accelerate, evaluate it and write a Hub-ready model folder.

Runs unchanged on one CPU, several CPU processes or several GPUs; the launcher decides:

    python training/train_points.py --output_dir runs/modelnet-nvc
    python training/train_points.py --dataset /path/to/ModelNet10_pcd.tar.gz --output_dir runs/modelnet-nvc
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no training/train_points.py --output_dir runs/modelnet-nvc

With only `--output_dir` it trains the demo model on the ModelNet10 subset in `data/modelnet10`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm


sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop import (  # noqa: E402
    NVCArguments,
    TrainingArguments,
    check_finite_weights,
    check_output_dir,
    create_accelerator,
    create_optimizer_and_scheduler,
    end_training,
    find_bottleneck,
    mean_loss_terms,
    parse_arguments,
    resume_from_checkpoint,
    save_checkpoint,
    total_training_steps,
    update_anchors,
)

from nvc_hf import NVCForPointCloudClassification, NVCPointConfig  # noqa: E402
from nvc_hf.data.pointclouds import augment_clouds, crop_clouds, load_modelnet_splits  # noqa: E402
from nvc_hf.evaluation import accuracy, cluster_metrics, plot_latents  # noqa: E402
from nvc_hf.model_card import describe_test_subset  # noqa: E402
from nvc_hf.model_card_points import write_point_model_card  # noqa: E402
from nvc_hf.modeling_nvc_point import chamfer_distance  # noqa: E402


logger = get_logger(__name__)

LOSS_TERMS = ("loss", "classification_loss", "reconstruction_loss", "kl_loss", "nebula_loss", "metric_loss")
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPOSITORY_ROOT / "data" / "modelnet10" / "ModelNet10_pcd_subset.tar.gz"
# Seed of the crops applied to the evaluation clouds, so every run and checkpoint is scored on the same partial clouds.
EVAL_CROP_SEED = 1234


@dataclass
class PointArguments:
    """Data, augmentation and model options of the point-cloud script."""

    dataset: str = field(
        default=str(DEFAULT_DATASET),
        metadata={"help": "ModelNet .tar.gz archive or folder of <class>/<split>/<name>.pcd files."},
    )
    num_points: int = field(default=1024, metadata={"help": "Points per cloud in the files (checked on reading)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Fraction of training clouds held out."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training clouds."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation/test clouds."}
    )
    num_train_points: int = field(
        default=512,
        metadata={"help": "Points drawn at random from each training cloud per step (evaluation uses all)."},
    )
    max_rotation_degrees: float = field(
        default=15.0,
        metadata={"help": "Largest random rotation about the up axis, in degrees (ModelNet10 shapes are aligned)."},
    )
    scale_min: float = field(default=0.8, metadata={"help": "Smallest random scale factor."})
    scale_max: float = field(default=1.25, metadata={"help": "Largest random scale factor."})
    jitter_sigma: float = field(default=0.01, metadata={"help": "Standard deviation of the per-point jitter."})
    up_axis: int = field(default=2, metadata={"help": "Index of the up axis (2: z, as in ModelNet)."})
    label_free: bool = field(default=False, metadata={"help": "Train without labels: Chamfer and NVC losses only."})
    completion: bool = field(
        default=False, metadata={"help": "Train on partial clouds (one side cut away) to reconstruct whole clouds."}
    )
    crop_ratio_min: float = field(default=0.15, metadata={"help": "Smallest fraction of points cut away in training."})
    crop_ratio_max: float = field(default=0.35, metadata={"help": "Largest fraction of points cut away in training."})
    eval_crop_ratio: float = field(
        default=0.25, metadata={"help": "Fraction of points cut away for the completion evaluation."}
    )
    reconstruction_weight: float | None = field(
        default=None, metadata={"help": "Weight of the Chamfer distance; 0 builds no decoder (default: config's)."}
    )
    point_mlp_sizes: str = field(default="64,128,256", metadata={"help": "Sizes of the shared per-point layers."})
    hidden_size: int = field(default=256, metadata={"help": "Cloud feature size."})
    dropout: float = field(default=0.2, metadata={"help": "Dropout of encoder and classifier."})
    baseline_results: str | None = field(
        default=None,
        metadata={"help": "results.json of a run with --bottleneck_type none, shown beside this run in the card."},
    )

    def __post_init__(self):
        if not 0 < self.num_train_points <= self.num_points:
            raise ValueError(f"--num_train_points must be in [1, {self.num_points}], got {self.num_train_points}.")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"--scale_min and --scale_max must satisfy 0 < min <= max, got {self.scale_min}, {self.scale_max}."
            )
        if self.up_axis not in (0, 1, 2):
            raise ValueError(f"--up_axis must be 0, 1 or 2, got {self.up_axis}.")
        if not 0 <= self.crop_ratio_min <= self.crop_ratio_max < 1:
            raise ValueError("--crop_ratio_min and --crop_ratio_max must satisfy 0 <= min <= max < 1.")
        if not 0 < self.eval_crop_ratio < 1:
            raise ValueError(f"--eval_crop_ratio must be in (0, 1), got {self.eval_crop_ratio}.")
        if self.baseline_results is not None and not Path(self.baseline_results).is_file():
            raise FileNotFoundError(f"--baseline_results {self.baseline_results} not found; pass a results.json file.")


def make_dataloader(clouds, labels, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    dataset = TensorDataset(torch.as_tensor(clouds), torch.as_tensor(labels, dtype=torch.long))
    # Creating an iterator draws a base seed. With its own generator, that draw leaves the global random stream
    # (augmentation, dropout, latent sampling) alone, so a resumed run continues the stream exactly.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def crop_eval_clouds(
    clouds: torch.Tensor, crop_ratio: float, seed: int = EVAL_CROP_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every evaluation cloud of `(count, points, 3)` once, before the clouds are split between processes.

    Cloud `i` is cropped with a generator seeded with `seed + i`, so its partial cloud depends only on the seed and
    its index: not on the process count, the batch size or how many clouds follow it. Returns the partial clouds
    `(count, kept, 3)` and their `point_mask` `(count, kept)`.
    """
    partials, point_masks = [], []
    for index in range(clouds.shape[0]):
        generator = torch.Generator().manual_seed(seed + index)
        partial, point_mask = crop_clouds(clouds[index : index + 1], (crop_ratio, crop_ratio), generator=generator)
        partials.append(partial[0])
        point_masks.append(point_mask[0])
    # With one fixed ratio, clouds of equal size keep equal point counts, so the crops stack without padding.
    return torch.stack(partials), torch.stack(point_masks)


def make_eval_dataloader(clouds, labels, batch_size: int, crop_ratio: float) -> DataLoader:
    """Batches of `(points, labels, partial points, partial point_mask)` in dataset order, for `predict`."""
    clouds = torch.as_tensor(clouds)
    partial, point_mask = crop_eval_clouds(clouds, crop_ratio)
    dataset = TensorDataset(clouds, torch.as_tensor(labels, dtype=torch.long), partial, point_mask)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def prepare_training_batch(points: torch.Tensor, point_args: PointArguments) -> dict[str, torch.Tensor]:
    """Subsample and augment a batch of whole clouds; in completion mode, crop them and keep the whole as target."""
    order = torch.rand(points.shape[:2], device=points.device).argsort(dim=1)[:, : point_args.num_train_points]
    points = torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    points = augment_clouds(
        points,
        max_rotation_degrees=point_args.max_rotation_degrees,
        scale_range=(point_args.scale_min, point_args.scale_max),
        jitter_sigma=point_args.jitter_sigma,
        up_axis=point_args.up_axis,
    )
    if not point_args.completion:
        return {"points": points}
    partial, point_mask = crop_clouds(points, (point_args.crop_ratio_min, point_args.crop_ratio_max))
    return {"points": partial, "point_mask": point_mask, "target_points": points}


def chunked_chamfer_distance(predicted: torch.Tensor, target: torch.Tensor, chunk_size: int = 32) -> torch.Tensor:
    """Chamfer distance per cloud, computed a few clouds at a time (each cloud pair needs an m x n matrix)."""
    chunks = [
        chamfer_distance(predicted[start : start + chunk_size], target[start : start + chunk_size])
        for start in range(0, predicted.shape[0], chunk_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def predict(model, dataloader, accelerator) -> dict[str, np.ndarray]:
    """Run the model over whole and cropped clouds; gather predictions, labels, means, assignments and Chamfer.

    `dataloader` comes from `make_eval_dataloader`, which crops the clouds before they are split between
    processes, so every evaluation scores the same partial clouds whatever the process count.
    """
    model.eval()
    keys = ("predictions", "partial_predictions", "labels", "means", "assignments", "reconstruction", "completion")
    gathered = {key: [] for key in keys}
    for points, labels, partial, point_mask in dataloader:
        outputs = model(points=points)
        partial_outputs = model(points=partial, point_mask=point_mask)
        assignments = outputs.assignments if outputs.assignments is not None else torch.zeros_like(labels)
        if outputs.reconstruction is not None:
            reconstruction = chunked_chamfer_distance(outputs.reconstruction, points)
            completion = chunked_chamfer_distance(partial_outputs.reconstruction, points)
        else:
            reconstruction = completion = torch.full(labels.shape, float("nan"), device=points.device)
        batch = (
            outputs.logits.argmax(-1),
            partial_outputs.logits.argmax(-1),
            labels,
            outputs.mean.float(),
            assignments,
            reconstruction,
            completion,
        )
        # `gather_for_metrics` drops the samples duplicated to even out the last batch across processes.
        for key, value in zip(keys, accelerator.gather_for_metrics(batch)):
            gathered[key].append(value.cpu())
    model.train()
    return {key: torch.cat(values).numpy() for key, values in gathered.items()}


def score(predictions: dict[str, np.ndarray], num_anchors: int | None, num_labels: int, seed: int) -> dict:
    """Accuracies, Chamfer distances, clustering of the anchor assignments and k-means clustering of the means."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import balanced_accuracy_score

    labels = predictions["labels"]
    results = {
        "accuracy": accuracy(predictions["predictions"], labels),
        # Mean over classes of the per-class accuracy (recall), the usual ModelNet "mean-class accuracy".
        "mean_class_accuracy": float(balanced_accuracy_score(labels, predictions["predictions"])),
        "partial_accuracy": accuracy(predictions["partial_predictions"], labels),
    }
    if not np.isnan(predictions["reconstruction"]).any():
        results["reconstruction_chamfer"] = float(predictions["reconstruction"].mean())
        results["completion_chamfer"] = float(predictions["completion"].mean())
    if num_anchors is not None:
        anchor = cluster_metrics(predictions["assignments"], labels, num_clusters=num_anchors)
        results.update({f"anchor_{key}": value for key, value in anchor.items()})
    num_clusters = num_anchors or num_labels
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit(predictions["means"])
    clustered = cluster_metrics(kmeans.labels_, labels, num_clusters=num_clusters)
    results.update({f"kmeans_{key}": value for key, value in clustered.items()})
    return results


def main(argv: list[str] | None = None) -> dict:
    point_args, nvc_args, training_args = parse_arguments(PointArguments, NVCArguments, TrainingArguments, args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = check_output_dir(training_args.output_dir)
    accelerator = create_accelerator(training_args)
    logger.info(accelerator.state, main_process_only=False)

    # Data: PCD files read from the archive, each cloud centred and scaled to the unit sphere.
    splits = load_modelnet_splits(
        point_args.dataset,
        validation_fraction=point_args.validation_fraction,
        seed=training_args.seed,
        max_train_samples=point_args.max_train_samples,
        max_eval_samples=point_args.max_eval_samples,
        expected_points=point_args.num_points,
    )
    label_names = splits["label_names"]
    logger.info(
        f"{len(splits['train'][1])} training, {len(splits['validation'][1])} validation and "
        f"{len(splits['test'][1])} test clouds of {len(label_names)} classes from {point_args.dataset}"
    )
    train_dataloader = make_dataloader(
        *splits["train"], training_args.per_device_train_batch_size, shuffle=True, seed=training_args.seed
    )
    eval_dataloader = make_dataloader(*splits["validation"], training_args.per_device_eval_batch_size, shuffle=False)
    test_dataloader = make_eval_dataloader(
        *splits["test"], training_args.per_device_eval_batch_size, crop_ratio=point_args.eval_crop_ratio
    )

    # Model: the step count is known before `prepare`, because the anchor warm-up is a fraction of it. The
    # dataloader is sharded by `prepare`, so the per-process batch count is divided by the process count.
    batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_training_steps, num_epochs = total_training_steps(training_args, batches_per_epoch)
    nvc_kwargs = nvc_args.config_kwargs(num_training_steps)
    if point_args.label_free:
        # Without a classification loss the Chamfer and NVC terms carry the training, at the authors' weight 1.
        for name in ("kl_weight", "nebula_weight", "metric_weight"):
            nvc_kwargs.setdefault(name, 1.0)
    if point_args.reconstruction_weight is not None:
        nvc_kwargs["reconstruction_weight"] = point_args.reconstruction_weight
    if (point_args.completion or point_args.label_free) and nvc_kwargs.get("reconstruction_weight", 1.0) == 0:
        raise ValueError("--completion and --label_free train the decoder; set --reconstruction_weight above 0.")
    config = NVCPointConfig(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        point_mlp_sizes=[int(value) for value in point_args.point_mlp_sizes.split(",")],
        hidden_size=point_args.hidden_size,
        dropout=point_args.dropout,
        num_decoder_points=point_args.num_points,
        **nvc_kwargs,
    )
    model = NVCForPointCloudClassification(config)
    if model.bottleneck.has_anchors:
        model.bottleneck.freeze_anchors_after_init = nvc_args.freeze_anchors
    optimizer, scheduler = create_optimizer_and_scheduler(model, training_args, num_training_steps)

    model, optimizer, train_dataloader, eval_dataloader, test_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, test_dataloader, scheduler
    )
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_points", config={**asdict(nvc_args), "learning_rate": training_args.learning_rate}
        )

    global_step, start_epoch = 0, 0
    if training_args.resume_from_checkpoint:
        global_step, start_epoch = resume_from_checkpoint(
            accelerator, training_args.resume_from_checkpoint, output_dir, model=model
        )
    steps_per_epoch = max(len(train_dataloader) // training_args.gradient_accumulation_steps, 1)

    # Training.
    progress = tqdm(
        total=num_training_steps,
        initial=global_step,
        disable=training_args.disable_tqdm or not accelerator.is_local_main_process,
        desc="train",
    )
    history, anchor_statistics = [], {}
    started = time.perf_counter()
    step_seconds = []
    model.train()
    for epoch in range(start_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        completed_in_epoch = global_step - epoch * steps_per_epoch
        if completed_in_epoch > 0:
            # Resuming mid-epoch: skip the batches the checkpointed run already trained on.
            batches = accelerator.skip_first_batches(
                train_dataloader, completed_in_epoch * training_args.gradient_accumulation_steps
            )

        for points, labels in batches:
            step_started = time.perf_counter()
            with accelerator.accumulate(model):
                inputs = prepare_training_batch(points, point_args)
                outputs = model(**inputs, labels=None if point_args.label_free else labels)
                if not torch.isfinite(outputs.loss):
                    raise FloatingPointError(
                        f"The training loss became {outputs.loss.item()} at step {global_step}; lower "
                        "--learning_rate or the loss weights. No checkpoint is written from this state."
                    )
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and training_args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            anchor_statistics = update_anchors(model, optimizer) or anchor_statistics
            step_seconds.append(time.perf_counter() - step_started)

            if global_step % training_args.logging_steps == 0:
                logs = {**mean_loss_terms(outputs, LOSS_TERMS), **anchor_statistics, "lr": scheduler.get_last_lr()[0]}
                progress.set_postfix(loss=f"{logs['loss']:.3f}", anchors=logs.get("anchors_in_use", "-"))
                logger.info(f"step {global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                accelerator.log(logs, step=global_step)
            if training_args.save_steps > 0 and global_step % training_args.save_steps == 0:
                save_checkpoint(
                    accelerator, output_dir, global_step, epoch, training_args.save_total_limit, model=model
                )
            if training_args.eval_steps > 0 and global_step % training_args.eval_steps == 0:
                history.append({"step": global_step, **evaluate_split(model, eval_dataloader, accelerator, config)})
            if global_step >= num_training_steps:
                break

        if training_args.eval_steps == 0:
            history.append({"step": global_step, **evaluate_split(model, eval_dataloader, accelerator, config)})
            logger.info(f"epoch {epoch}: validation {history[-1]}")
        if global_step >= num_training_steps:
            break
    progress.close()
    train_minutes = (time.perf_counter() - started) / 60
    # The last optimizer step ran after the last loss check, so a diverged model is caught here, before saving.
    check_finite_weights(model, global_step)

    # Final evaluation on the test set, which played no part in training or model selection.
    test_predictions = predict(model, test_dataloader, accelerator)
    bottleneck = find_bottleneck(accelerator.unwrap_model(model))
    num_anchors = config.num_anchors if bottleneck is not None and bottleneck.has_anchors else None
    results = score(test_predictions, num_anchors, len(label_names), training_args.seed)
    results.update(
        {
            "train_minutes": train_minutes,
            "global_step": global_step,
            "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
            "num_processes": accelerator.num_processes,
            **{f"final_{key}": value for key, value in anchor_statistics.items()},
        }
    )

    # The Hub-ready folder: weights, config (with the label names), training arguments, plot, results and card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        anchors = bottleneck.anchors.detach().float().cpu().numpy() if num_anchors is not None else None
        plot_latents(
            test_predictions["means"],
            test_predictions["labels"],
            output_dir / "latent_space.png",
            anchors=anchors,
            title=f"ModelNet test latents (PCA), bottleneck_type={config.bottleneck_type}",
        )
        baseline_results = None
        if point_args.baseline_results is not None:
            baseline_results = json.loads(Path(point_args.baseline_results).read_text())["test"]
        arguments = {"points": asdict(point_args), "nvc": asdict(nvc_args), "training": asdict(training_args)}
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        (output_dir / "results.json").write_text(json.dumps({"test": results, "validation": history}, indent=2))
        write_point_model_card(
            output_dir,
            config=config,
            dataset_name="ModelNet10" if "modelnet10" in point_args.dataset.lower() else point_args.dataset,
            results=results,
            training_arguments=arguments,
            label_free=point_args.label_free,
            completion=point_args.completion,
            baseline_results=baseline_results,
            test_subset=describe_test_subset(
                len(splits["test"][1]), splits["test_size"], f"clouds in {Path(point_args.dataset).name}", "random"
            ),
        )
        logger.info(f"test results: {json.dumps(results)}")
        logger.info(f"Model folder written to {output_dir}")
    end_training(accelerator)
    return results


def evaluate_split(model, dataloader, accelerator, config) -> dict[str, float]:
    model.eval()
    predictions, labels, assignments = [], [], []
    with torch.no_grad():
        for points, batch_labels in dataloader:
            outputs = model(points=points)
            batch_assignments = (
                outputs.assignments if outputs.assignments is not None else torch.zeros_like(batch_labels)
            )
            gathered = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch_labels, batch_assignments))
            for store, value in zip((predictions, labels, assignments), gathered):
                store.append(value.cpu())
    model.train()
    predictions, labels, assignments = (torch.cat(values).numpy() for values in (predictions, labels, assignments))
    results = {"accuracy": accuracy(predictions, labels)}
    if config.bottleneck_type == "nvc":
        clusters = cluster_metrics(assignments, labels, num_clusters=config.num_anchors)
        results["anchor_nmi"] = clusters["nmi"]
        results["anchors_in_use"] = clusters["clusters_used"]
    return results


if __name__ == "__main__":
    main()
