"""Train an NVC image model with Accelerate, evaluate it and write a Hub-ready model folder.

Runs unchanged on one CPU, several CPU processes or several GPUs; the launcher decides:

    python training/train_image.py --output_dir runs/mnist-nvc
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no training/train_image.py --output_dir runs/mnist-nvc

With only `--output_dir` it trains the demo model on the full MNIST training set in `data/mnist`.
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
    replica_checksums,
    resume_from_checkpoint,
    save_checkpoint,
    total_training_steps,
    update_anchors,
)

from nvc_hf import NVCForImageClassification, NVCImageProcessor, NVCVisionConfig  # noqa: E402
from nvc_hf.data import load_image_splits  # noqa: E402
from nvc_hf.evaluation import accuracy, cluster_metrics, plot_latents  # noqa: E402
from nvc_hf.model_card import describe_test_subset, write_model_card  # noqa: E402


logger = get_logger(__name__)

LOSS_TERMS = ("loss", "classification_loss", "reconstruction_loss", "kl_loss", "nebula_loss", "metric_loss")
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ImageArguments:
    """Data and model options of the image script."""

    dataset: str = field(
        default=str(REPOSITORY_ROOT / "data" / "mnist"),
        metadata={"help": "Folder of MNIST IDX files, a folder saved with datasets.save_to_disk, or a dataset name."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of a datasets dataset."})
    validation_size: int = field(default=5000, metadata={"help": "Training images held out for validation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation/test images."}
    )
    label_free: bool = field(
        default=False, metadata={"help": "Train without labels: reconstruction and NVC losses only."}
    )
    reconstruction_weight: float | None = field(
        default=None, metadata={"help": "Weight of the reconstruction loss; default 0.01 with labels, 1.0 label-free."}
    )
    random_shift: int = field(
        default=0, metadata={"help": "Augmentation: shift training images by up to N pixels in each direction."}
    )
    conv_channels: str = field(default="32,64", metadata={"help": "Channels of the two convolutional stages."})
    hidden_size: int = field(default=256, metadata={"help": "Encoder feature size."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout of encoder and classifier."})


def make_dataloader(pixel_values, labels, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    dataset = TensorDataset(torch.as_tensor(pixel_values), torch.as_tensor(labels, dtype=torch.long))
    # A generator of its own keeps the loader from drawing on the global RNG when an epoch starts, so a run
    # resumed mid-epoch samples the same latent noise and dropout masks as an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def shift_randomly(pixel_values: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of `(batch, channels, height, width)` by up to `max_shift` pixels, filling with zeros."""
    padded = torch.nn.functional.pad(pixel_values, (max_shift,) * 4)
    height, width = pixel_values.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (pixel_values.shape[0], 2))
    shifted = [
        image[:, top : top + height, left : left + width] for image, (top, left) in zip(padded, offsets.tolist())
    ]
    return torch.stack(shifted)


@torch.no_grad()
def predict(model, dataloader, accelerator) -> dict[str, np.ndarray]:
    """Run the model over a dataloader; gather predictions, labels, latent means and anchor assignments."""
    model.eval()
    gathered = {"predictions": [], "labels": [], "means": [], "assignments": []}
    for pixel_values, labels in dataloader:
        outputs = model(pixel_values=pixel_values)
        assignments = outputs.assignments if outputs.assignments is not None else torch.zeros_like(labels)
        batch = (outputs.logits.argmax(-1), labels, outputs.mean.float(), assignments)
        # `gather_for_metrics` drops the samples duplicated to even out the last batch across processes.
        for key, value in zip(gathered, accelerator.gather_for_metrics(batch)):
            gathered[key].append(value.cpu())
    model.train()
    return {key: torch.cat(values).numpy() for key, values in gathered.items()}


def score(predictions: dict[str, np.ndarray], num_anchors: int | None, seed: int) -> dict[str, float]:
    """Accuracy, clustering of the anchor assignments, and k-means clustering of the latent means."""
    from sklearn.cluster import KMeans

    results = {"accuracy": accuracy(predictions["predictions"], predictions["labels"])}
    if num_anchors is not None:
        anchor = cluster_metrics(predictions["assignments"], predictions["labels"], num_clusters=num_anchors)
        results.update({f"anchor_{key}": value for key, value in anchor.items()})
        shares = np.bincount(predictions["assignments"], minlength=num_anchors) / len(predictions["assignments"])
        results["anchors_in_use"] = int((shares >= 0.01).sum())
    num_clusters = num_anchors or 10
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit(predictions["means"])
    clustered = cluster_metrics(kmeans.labels_, predictions["labels"], num_clusters=num_clusters)
    results.update({f"kmeans_{key}": value for key, value in clustered.items()})
    return results


def main(argv: list[str] | None = None) -> dict:
    image_args, nvc_args, training_args = parse_arguments(ImageArguments, NVCArguments, TrainingArguments, args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = check_output_dir(training_args.output_dir)
    accelerator = create_accelerator(training_args)
    logger.info(accelerator.state, main_process_only=False)

    # Data: MNIST IDX files or a datasets dataset, as float images in [0, 1].
    splits = load_image_splits(
        image_args.dataset,
        validation_size=image_args.validation_size,
        seed=training_args.seed,
        image_column=image_args.image_column,
        label_column=image_args.label_column,
        max_train_samples=image_args.max_train_samples,
        max_eval_samples=image_args.max_eval_samples,
    )
    train_batch, eval_batch, seed = (
        training_args.per_device_train_batch_size,
        training_args.per_device_eval_batch_size,
        training_args.seed,
    )
    train_dataloader = make_dataloader(*splits["train"], train_batch, shuffle=True, seed=seed)
    eval_dataloader = make_dataloader(*splits["validation"], eval_batch, shuffle=False, seed=seed)
    test_dataloader = make_dataloader(*splits["test"], eval_batch, shuffle=False, seed=seed)

    # Model: the step count is known before `prepare`, because the anchor warm-up is a fraction of it. The
    # dataloader is sharded by `prepare`, so the per-process batch count is divided by the process count.
    batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_training_steps, num_epochs = total_training_steps(training_args, batches_per_epoch)
    nvc_kwargs = nvc_args.config_kwargs(num_training_steps)
    reconstruction_weight = image_args.reconstruction_weight
    if image_args.label_free:
        # Without a classification loss the summed reconstruction and NVC terms balance each other at weight 1,
        # the authors' reference setting; the config defaults are tuned for supervised training.
        reconstruction_weight = 1.0 if reconstruction_weight is None else reconstruction_weight
        for name in ("kl_weight", "nebula_weight", "metric_weight"):
            nvc_kwargs.setdefault(name, 1.0)
    num_channels, image_size = splits["train"][0].shape[1], splits["train"][0].shape[2]
    config = NVCVisionConfig(
        num_channels=num_channels,
        image_size=image_size,
        num_labels=len(splits["label_names"]),
        id2label=dict(enumerate(splits["label_names"])),
        label2id={name: index for index, name in enumerate(splits["label_names"])},
        conv_channels=[int(value) for value in image_args.conv_channels.split(",")],
        hidden_size=image_args.hidden_size,
        dropout=image_args.dropout,
        **({} if reconstruction_weight is None else {"reconstruction_weight": reconstruction_weight}),
        **nvc_kwargs,
    )
    model = NVCForImageClassification(config)
    if model.bottleneck.has_anchors:
        model.bottleneck.freeze_anchors_after_init = nvc_args.freeze_anchors
    optimizer, scheduler = create_optimizer_and_scheduler(model, training_args, num_training_steps)

    model, optimizer, train_dataloader, eval_dataloader, test_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, test_dataloader, scheduler
    )
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_image", config={**asdict(nvc_args), "learning_rate": training_args.learning_rate}
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
        if global_step >= num_training_steps:
            break  # resumed from the final checkpoint
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        completed_in_epoch = global_step - epoch * steps_per_epoch
        if completed_in_epoch > 0:
            # Resuming mid-epoch: skip the batches the checkpointed run already trained on.
            batches = accelerator.skip_first_batches(
                train_dataloader, completed_in_epoch * training_args.gradient_accumulation_steps
            )

        for pixel_values, labels in batches:
            step_started = time.perf_counter()
            if image_args.random_shift > 0:
                pixel_values = shift_randomly(pixel_values, image_args.random_shift)
            with accelerator.accumulate(model):
                outputs = model(pixel_values=pixel_values, labels=None if image_args.label_free else labels)
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
    results = score(test_predictions, num_anchors, training_args.seed)
    results.update(
        {
            "train_minutes": train_minutes,
            "global_step": global_step,
            "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
            "num_processes": accelerator.num_processes,
            "replica_checksums": replica_checksums(accelerator, model),
            **{f"final_{key}": value for key, value in anchor_statistics.items()},
        }
    )

    # The Hub-ready folder: weights, config, processor, training arguments, plot, results and model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        NVCImageProcessor(num_channels=num_channels, size={"height": image_size, "width": image_size}).save_pretrained(
            output_dir
        )
        anchors = bottleneck.anchors.detach().float().cpu().numpy() if num_anchors is not None else None
        plot_latents(
            test_predictions["means"],
            test_predictions["labels"],
            output_dir / "latent_space.png",
            anchors=anchors,
            title=f"Test latents (PCA), bottleneck_type={config.bottleneck_type}",
        )
        arguments = {"image": asdict(image_args), "nvc": asdict(nvc_args), "training": asdict(training_args)}
        num_test = len(splits["test"][1])
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        (output_dir / "results.json").write_text(json.dumps({"test": results, "validation": history}, indent=2))
        write_model_card(
            output_dir,
            config=config,
            task="image-classification",
            dataset_name="MNIST" if "mnist" in image_args.dataset.lower() else image_args.dataset,
            results=results,
            training_arguments=arguments,
            label_free=image_args.label_free,
            test_subset=describe_test_subset(num_test, splits["test_size"], "images"),
            test_split="test" if num_test == splits["test_size"] else f"test[:{num_test}]",
        )
        logger.info(f"test results: {json.dumps(results)}")
        logger.info(f"Model folder written to {output_dir}")
    end_training(accelerator)
    return results


def evaluate_split(model, dataloader, accelerator, config) -> dict[str, float]:
    predictions = predict(model, dataloader, accelerator)
    results = {"accuracy": accuracy(predictions["predictions"], predictions["labels"])}
    if config.bottleneck_type == "nvc":
        clusters = cluster_metrics(predictions["assignments"], predictions["labels"], num_clusters=config.num_anchors)
        results["anchor_nmi"] = clusters["nmi"]
        results["anchors_in_use"] = clusters["clusters_used"]
    return results


if __name__ == "__main__":
    main()
