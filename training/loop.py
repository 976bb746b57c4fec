"""Plumbing shared by the training scripts: arguments, Accelerate set-up, optimizer, checkpoints and anchor upkeep.

Each script keeps its own top-to-bottom training loop; only what would otherwise be copied between them lives here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, get_scheduler

from nvc_hf.nebula import NVCBottleneck


logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
WARMUP_MEANS_FILE = "anchor_warmup_means.safetensors"


@dataclass
class TrainingArguments:
    """Optimisation, logging and checkpointing options, named as in transformers' example scripts."""

    output_dir: str = field(metadata={"help": "Folder for the trained model, its card, plots and checkpoints."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs (ignored if max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs if > 0."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch size per process."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not applied to anchors)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up: linear, cosine, ..."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of steps with a linear learning-rate warm-up."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    seed: int = field(default=42, metadata={"help": "Seed for weights, data order and sampling."})
    logging_steps: int = field(default=50, metadata={"help": "Log loss terms and anchor usage every N steps."})
    eval_steps: int = field(
        default=0, metadata={"help": "Evaluate on the validation split every N steps; 0: per epoch."}
    )
    save_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps; 0 disables."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept in output_dir (oldest removed)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint folder to resume from, or 'latest' for the newest in output_dir."}
    )
    report_to: str = field(default="none", metadata={"help": "Experiment tracker: none or tensorboard."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"--report_to must be none or tensorboard, got {self.report_to!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set --max_steps or --num_train_epochs to a positive value.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


@dataclass
class NVCArguments:
    """Bottleneck settings; each maps onto the field of the same name in the model config."""

    bottleneck_type: str = field(default="nvc", metadata={"help": "nvc, vae (no anchors) or none (no NVC)."})
    latent_size: int | None = field(
        default=None, metadata={"help": "Latent size; default: the head's (32 for images and points, 256 for text)."}
    )
    num_anchors: int = field(default=30, metadata={"help": "Number of nebula anchors."})
    kl_prior: str = field(default="anchor", metadata={"help": "KL prior: anchor (N(a_k, I)) or standard (N(0, I))."})
    metric_loss: str = field(default="triplet", metadata={"help": "Metric loss: triplet or ratio."})
    nebula_distance: str = field(default="softplus", metadata={"help": "softplus, clamp or raw."})
    nebula_radius: str = field(default="auto", metadata={"help": "Separation radius, or auto."})
    mass_reduction: str = field(default="mean", metadata={"help": "Anchor mass reduction: mean or sum."})
    metric_margin: float = field(default=1.0, metadata={"help": "Triplet margin."})
    kl_weight: float | None = field(
        default=None, metadata={"help": "Weight of the KL term (default: the model config's)."}
    )
    nebula_weight: float | None = field(
        default=None, metadata={"help": "Weight of the nebula loss (default: the model config's)."}
    )
    metric_weight: float | None = field(
        default=None, metadata={"help": "Weight of the metric loss (default: the model config's)."}
    )
    anchor_warmup_ratio: float = field(
        default=0.5,
        metadata={"help": "Fraction of training run as a plain VAE before the anchors are set by k-means."},
    )
    freeze_anchors: bool = field(
        default=False, metadata={"help": "Control run: keep the k-means anchors fixed after the warm-up."}
    )

    def config_kwargs(self, total_steps: int) -> dict:
        """Return the config fields for a run of `total_steps` optimizer steps."""
        if not 0 <= self.anchor_warmup_ratio < 1:
            raise ValueError(f"--anchor_warmup_ratio must be in [0, 1), got {self.anchor_warmup_ratio}.")
        radius = self.nebula_radius
        if radius != "auto":
            try:
                radius = float(radius)
            except ValueError:
                raise ValueError(f"--nebula_radius must be a positive number or 'auto', got {radius!r}.") from None
        kwargs = asdict(self)
        kwargs.pop("anchor_warmup_ratio")
        kwargs.pop("freeze_anchors")
        kwargs["nebula_radius"] = radius
        kwargs["anchor_warmup_steps"] = int(self.anchor_warmup_ratio * total_steps)
        return {name: value for name, value in kwargs.items() if value is not None}


def parse_arguments(*dataclass_types, args: list[str] | None = None):
    """Parse command-line arguments into the given dataclasses with `HfArgumentParser`."""
    parser = HfArgumentParser(dataclass_types)
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=args)


def check_output_dir(output_dir: str | Path) -> Path:
    """Create `output_dir` and fail at once, before any training, if it cannot be written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise SystemExit(f"Cannot write to --output_dir {path}: {error}. Choose a writable folder.") from error
    return path


def create_accelerator(args: TrainingArguments) -> Accelerator:
    """Build the Accelerator and seed every process; the launcher decides how many processes and devices run."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")
        ),
        # A seedable sampler makes the shuffled order a function of the seed and epoch, so a resumed run gets the
        # same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The anchors receive no gradient during the warm-up, and label-free runs leave the classifier unused, so
        # DDP must not expect a gradient for every parameter.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    return accelerator


def create_optimizer_and_scheduler(
    model: torch.nn.Module, args: TrainingArguments, num_training_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW without weight decay on biases, norms and anchors, and a warm-up schedule over `num_training_steps`."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.dim() < 2 or name.endswith("anchors"):
            not_decayed.append(parameter)
        else:
            decayed.append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": args.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * num_training_steps),
        num_training_steps=num_training_steps,
    )
    return optimizer, scheduler


def total_training_steps(args: TrainingArguments, batches_per_epoch: int) -> tuple[int, int]:
    """Return `(optimizer steps, epochs)` for the run: `max_steps` if set, else `num_train_epochs` epochs."""
    steps_per_epoch = max(batches_per_epoch // args.gradient_accumulation_steps, 1)
    if args.max_steps > 0:
        return args.max_steps, math.ceil(args.max_steps / steps_per_epoch)
    return math.ceil(args.num_train_epochs * steps_per_epoch), math.ceil(args.num_train_epochs)


def find_bottleneck(model: torch.nn.Module) -> NVCBottleneck | None:
    """Return the NVC bottleneck inside `model` (wrapped or not), or `None`."""
    for module in model.modules():
        if isinstance(module, NVCBottleneck):
            return module
    return None


def update_anchors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Run the bottleneck's anchor upkeep after an optimizer step; return anchor statistics (empty without NVC)."""
    bottleneck = find_bottleneck(model)
    return bottleneck.update_anchors(optimizer) if bottleneck is not None else {}


@torch.no_grad()
def replica_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[float]:
    """Gather one checksum of every process's weights and buffers (anchors included) and raise if they differ.

    Processes that drift apart (for example through an anchor reseeded on one rank only) would otherwise go
    unnoticed until the saved model, taken from rank 0, fails to match what the other ranks trained.
    """
    state = accelerator.unwrap_model(model).state_dict()
    checksum = sum(float(tensor.double().sum()) + float(tensor.double().abs().sum()) for tensor in state.values())
    gathered = accelerator.gather(torch.tensor([checksum], dtype=torch.float64, device=accelerator.device))
    checksums = gathered.cpu().tolist()
    if any(value != checksums[0] for value in checksums):
        raise RuntimeError(f"The processes hold different weights after training (checksums {checksums}).")
    return checksums


@torch.no_grad()
def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Raise `FloatingPointError` naming the tensors if any floating-point weight or buffer is NaN or infinite.

    The loss is checked before each optimizer step, but that step itself can write NaN into the weights (an
    infinite gradient, say), so the weights are checked again before anything is saved from them.
    """
    non_finite = [
        name
        for name, tensor in model.state_dict().items()
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all()
    ]
    if non_finite:
        listed = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
        raise FloatingPointError(
            f"The weights became NaN or infinite at step {step} ({listed}); lower --learning_rate or the loss "
            "weights. Nothing is saved from this state."
        )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    epoch: int,
    save_total_limit: int,
    model: torch.nn.Module | None = None,
) -> None:
    """Write a resumable checkpoint `checkpoint-<step>` atomically: first into a temporary folder, then a rename.

    A process killed while writing leaves the previous checkpoints intact. With `model`, the weights are first
    checked to be finite (`FloatingPointError` otherwise, and nothing is written), and the latent means kept for
    the anchors' k-means initialisation are saved too, so a run resumed during the anchor warm-up sets the same
    anchors as an uninterrupted one.
    """
    if model is not None:
        check_finite_weights(model, step)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        bottleneck = find_bottleneck(model) if model is not None else None
        if bottleneck is not None and bottleneck.has_anchors:
            # Rank 0's k-means result is broadcast to the other processes, so its sample alone decides the anchors.
            chunks = {
                f"chunk_{index:05d}": chunk.contiguous().cpu() for index, chunk in enumerate(bottleneck._warmup_means)
            }
            save_file(chunks, temporary / WARMUP_MEANS_FILE)
        (temporary / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": step, "epoch": epoch}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-save_total_limit] if save_total_limit > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = [path for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (path / TRAINER_STATE_FILE).exists()]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def resume_from_checkpoint(
    accelerator: Accelerator, checkpoint: str, output_dir: Path, model: torch.nn.Module | None = None
) -> tuple[int, int]:
    """Load model, optimizer, scheduler and RNG states (and with `model`, the anchor warm-up sample); return
    `(global_step, epoch)` of the checkpoint."""
    if checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint found in {output_dir}.")
        path = checkpoints[-1]
    else:
        path = Path(checkpoint)
    state_file = path / TRAINER_STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint ({TRAINER_STATE_FILE} is missing); pass a checkpoint-<step> folder."
        )
    accelerator.load_state(str(path))
    bottleneck = find_bottleneck(model) if model is not None else None
    if bottleneck is not None and (path / WARMUP_MEANS_FILE).exists():
        chunks = load_file(path / WARMUP_MEANS_FILE, device=str(accelerator.device))
        bottleneck._warmup_means = [chunks[name] for name in sorted(chunks)]
    state = json.loads(state_file.read_text())
    logger.info(f"Resumed from {path} at step {state['global_step']}.", main_process_only=True)
    return int(state["global_step"]), int(state["epoch"])


def end_training(accelerator: Accelerator) -> None:
    """Close trackers and shut the process group down while Python still runs.

    Left to interpreter exit, the gloo process group's destructor joins its worker thread while holding the GIL
    that the thread waits for, and a finished CPU run with several processes could hang there.
    """
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def mean_loss_terms(outputs, names: tuple[str, ...]) -> dict[str, float]:
    """Pick the scalar loss terms `names` from a model output, skipping absent ones."""
    terms = {}
    for name in names:
        value = getattr(outputs, name, None)
        if value is not None:
            terms[name] = float(value.detach())
    return terms
