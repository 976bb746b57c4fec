"""Train an NVC translation model with Accelerate, select it on validation BLEU and write a Hub-ready folder.

Runs unchanged on one CPU, several CPU processes or several GPUs; the launcher decides:

    python training/train_translation.py --output_dir runs/multi30k-nvc --max_steps 3000
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no training/train_translation.py --output_dir runs/multi30k-nvc

With only `--output_dir` it trains German-to-English on the Multi30k copy in `data/multi30k`. It trains a joint
BPE tokenizer on the training split and builds batches of about `--max_tokens` tokens from sentences of similar
length. Every `--eval_steps` steps it measures validation BLEU (greedy) and keeps the best weights, which translate
test_2016_flickr with beam search at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm


sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_translation import score_translations, translate  # noqa: E402
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

from nvc_hf import NVCForConditionalGeneration, NVCTextConfig, NVCTranslationPipeline  # noqa: E402
from nvc_hf.data.parallel_text import load_dataset_pairs, load_multi30k, read_parallel_files  # noqa: E402
from nvc_hf.data.subword import train_joint_tokenizer  # noqa: E402
from nvc_hf.model_card import describe_test_subset  # noqa: E402
from nvc_hf.model_card_text import write_translation_model_card  # noqa: E402


logger = get_logger(__name__)

LOSS_TERMS = ("loss", "token_loss", "nvc_loss", "kl_loss", "nebula_loss", "metric_loss")
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TranslationArguments:
    """Data, tokenizer and model options of the translation script."""

    dataset: str = field(
        default=str(REPOSITORY_ROOT / "data" / "multi30k"),
        metadata={"help": "Multi30k folder (<split>.<lang>.gz), or a folder saved with datasets.save_to_disk."},
    )
    source_lang: str = field(default="de", metadata={"help": "Source language code (file suffix)."})
    target_lang: str = field(default="en", metadata={"help": "Target language code (file suffix)."})
    train_files: str | None = field(
        default=None, metadata={"help": "Comma-separated source,target training files; overrides --dataset."}
    )
    validation_files: str | None = field(default=None, metadata={"help": "source,target validation files."})
    test_files: str | None = field(default=None, metadata={"help": "source,target test files."})
    source_column: str = field(default="source", metadata={"help": "Source column of a datasets dataset."})
    target_column: str = field(default="target", metadata={"help": "Target column of a datasets dataset."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Existing tokenizer folder; default: train a joint BPE on the training split."}
    )
    vocab_size: int = field(default=8000, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation pairs."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test pairs."})
    max_source_length: int = field(default=128, metadata={"help": "Longer sentences are truncated (tokens)."})
    max_tokens: int = field(
        default=4096, metadata={"help": "Tokens per training batch and process (source or target, padding included)."}
    )
    d_model: int = field(default=256, metadata={"help": "Transformer width."})
    encoder_layers: int = field(default=3, metadata={"help": "Encoder layers."})
    decoder_layers: int = field(default=3, metadata={"help": "Decoder layers."})
    attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    ffn_dim: int = field(default=1024, metadata={"help": "Feed-forward hidden size."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy."})
    bottleneck_level: str = field(default="sentence", metadata={"help": "sentence or token (see NVCTextConfig)."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Tie the output projection to the embedding."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training after this many minutes (evaluation time excluded); the schedule still "
            "follows --max_steps."
        },
    )
    eval_num_beams: int = field(default=1, metadata={"help": "Beam size of the validation BLEU during training."})
    test_num_beams: int = field(default=5, metadata={"help": "Beam size of the final test BLEU."})


class TranslationPairs(Dataset):
    """Tokenised sentence pairs; items are `(source_ids, target_ids)` lists ending with `</s>`."""

    def __init__(self, tokenizer, sources: list[str], targets: list[str], max_length: int):
        encoded = tokenizer(sources, text_target=targets, truncation=True, max_length=max_length)
        self.source_ids = encoded["input_ids"]
        self.target_ids = encoded["labels"]

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.source_ids[index], self.target_ids[index]


class TokenBatchSampler(Sampler):
    """Batches of sentences of similar length holding at most `max_tokens` padded tokens (source or target).

    The pairs are sorted by length inside pools of about 100 batches, cut into batches, and the batch order is
    shuffled every epoch. The batches themselves are fixed at construction, so every epoch has the same length
    (needed to shard them over processes and to resume mid-epoch).
    """

    def __init__(self, source_lengths: list[int], target_lengths: list[int], max_tokens: int, seed: int = 0):
        longest = max(max(source_lengths), max(target_lengths))
        if max_tokens < longest:
            raise ValueError(
                f"--max_tokens={max_tokens} is smaller than the longest sentence ({longest} tokens); raise it or "
                "lower --max_source_length."
            )
        self.seed = seed
        self.epoch = 0
        generator = random.Random(seed)
        order = list(range(len(source_lengths)))
        generator.shuffle(order)
        average = max(sum(target_lengths) / len(target_lengths), 1)
        pool_size = max(int(100 * max_tokens / average), 1)

        self.batches = []
        for start in range(0, len(order), pool_size):
            pool = sorted(order[start : start + pool_size], key=lambda i: (target_lengths[i], source_lengths[i]))
            batch, longest_in_batch = [], 0
            for index in pool:
                length = max(source_lengths[index], target_lengths[index])
                if batch and max(longest_in_batch, length) * (len(batch) + 1) > max_tokens:
                    self.batches.append(batch)
                    batch, longest_in_batch = [], 0
                batch.append(index)
                longest_in_batch = max(longest_in_batch, length)
            if batch:
                self.batches.append(batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(self.seed + self.epoch).shuffle(order)
        for index in order:
            yield self.batches[index]

    def __len__(self) -> int:
        return len(self.batches)


def collate_pairs(pad_token_id: int):
    """Return a collate function that pads sources with `pad_token_id` and labels with -100."""

    def collate(items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        source_length = max(len(source) for source, _ in items)
        target_length = max(len(target) for _, target in items)
        input_ids = torch.full((len(items), source_length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), source_length), dtype=torch.long)
        labels = torch.full((len(items), target_length), -100, dtype=torch.long)
        for row, (source, target) in enumerate(items):
            input_ids[row, : len(source)] = torch.tensor(source)
            attention_mask[row, : len(source)] = 1
            labels[row, : len(target)] = torch.tensor(target)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def split_files(value: str, option: str) -> tuple[str, str]:
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--{option} must be 'source_file,target_file', got {value!r}.")
    return parts[0], parts[1]


def load_pairs(args: TranslationArguments) -> dict[str, tuple[list[str], list[str]]]:
    """Load train, validation and test pairs from text files, a Multi30k folder or a `datasets` folder."""
    if args.train_files:
        splits = {"train": read_parallel_files(*split_files(args.train_files, "train_files"))}
        for split, option in (("validation", "validation_files"), ("test", "test_files")):
            value = getattr(args, option)
            if value is None:
                raise ValueError(f"--train_files also needs --{option}.")
            splits[split] = read_parallel_files(*split_files(value, option))
        return splits

    path = Path(args.dataset)
    if (path / "dataset_dict.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        missing = {"train", "validation", "test"} - set(loaded.keys())
        if missing:
            raise ValueError(f"Dataset {path} lacks the split(s) {sorted(missing)}; it has {list(loaded.keys())}.")
        return {
            split: load_dataset_pairs(loaded[split], args.source_column, args.target_column, f"{path}[{split}]")
            for split in ("train", "validation", "test")
        }
    if not path.is_dir():
        raise FileNotFoundError(f"--dataset {path} is not a folder; pass a Multi30k folder or --train_files.")
    return load_multi30k(path, args.source_lang, args.target_lang)


def main(argv: list[str] | None = None) -> dict:
    text_args, nvc_args, training_args = parse_arguments(
        TranslationArguments, NVCArguments, TrainingArguments, args=argv
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = check_output_dir(training_args.output_dir)
    accelerator = create_accelerator(training_args)
    logger.info(accelerator.state, main_process_only=False)

    # Data and tokenizer. The tokenizer is trained on the training split only (same result on every process).
    splits = load_pairs(text_args)
    full_test_size = len(splits["test"][0])
    if text_args.max_train_samples is not None:
        splits["train"] = tuple(side[: text_args.max_train_samples] for side in splits["train"])
    if text_args.max_eval_samples is not None:
        splits["validation"] = tuple(side[: text_args.max_eval_samples] for side in splits["validation"])
    if text_args.max_test_samples is not None:
        splits["test"] = tuple(side[: text_args.max_test_samples] for side in splits["test"])
    if text_args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(text_args.tokenizer)
    else:
        tokenizer = train_joint_tokenizer(splits["train"][0] + splits["train"][1], vocab_size=text_args.vocab_size)
    train_dataset = TranslationPairs(tokenizer, *splits["train"], max_length=text_args.max_source_length)
    batch_sampler = TokenBatchSampler(
        [len(ids) for ids in train_dataset.source_ids],
        [len(ids) for ids in train_dataset.target_ids],
        text_args.max_tokens,
        seed=training_args.seed,
    )
    # Every new loader iterator draws a seed. A generator of its own keeps that draw off the global RNG (dropout,
    # latent sampling), so a run resumed mid-epoch continues the same random stream as an uninterrupted run.
    train_dataloader = DataLoader(
        train_dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_pairs(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(training_args.seed),
    )

    # Model: the step count is known before `prepare`, because the anchor warm-up is a fraction of it.
    batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_training_steps, num_epochs = total_training_steps(training_args, batches_per_epoch)
    config = NVCTextConfig(
        vocab_size=len(tokenizer),
        d_model=text_args.d_model,
        encoder_layers=text_args.encoder_layers,
        decoder_layers=text_args.decoder_layers,
        attention_heads=text_args.attention_heads,
        ffn_dim=text_args.ffn_dim,
        dropout=text_args.dropout,
        label_smoothing=text_args.label_smoothing,
        bottleneck_level=text_args.bottleneck_level,
        tie_word_embeddings=text_args.tie_word_embeddings,
        max_position_embeddings=max(256, text_args.max_source_length + 2),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        **nvc_args.config_kwargs(num_training_steps),
    )
    model = NVCForConditionalGeneration(config)
    if model.bottleneck.has_anchors:
        model.bottleneck.freeze_anchors_after_init = nvc_args.freeze_anchors
    logger.info(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_training_steps} steps")
    optimizer, scheduler = create_optimizer_and_scheduler(model, training_args, num_training_steps)
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_translation", config={**asdict(nvc_args), "learning_rate": training_args.learning_rate}
        )

    global_step, start_epoch = 0, 0
    if training_args.resume_from_checkpoint:
        # NOTE: checkpoints leave out the validation history, the best weights so far and the means kept for the
        # k-means initialisation of the anchors. A resumed run picks its best weights among its own evaluations only,
        # and resuming during the anchor warm-up can initialise different anchors than an uninterrupted run.
        global_step, start_epoch = resume_from_checkpoint(
            accelerator, training_args.resume_from_checkpoint, output_dir, model=model
        )
    steps_per_epoch = max(len(train_dataloader) // training_args.gradient_accumulation_steps, 1)

    # Training. Minutes count training time only, so the BLEU-versus-minutes curve is not shifted by evaluation.
    progress = tqdm(
        total=num_training_steps,
        initial=global_step,
        disable=training_args.disable_tqdm or not accelerator.is_local_main_process,
        desc="train",
    )
    history, anchor_statistics = [], {}
    best = {"bleu": -1.0, "state": None, "step": 0}
    train_seconds, target_tokens = 0.0, 0
    out_of_time = False
    eval_steps = training_args.eval_steps if training_args.eval_steps > 0 else steps_per_epoch

    def evaluate_now() -> None:
        unwrapped = accelerator.unwrap_model(model)
        hypotheses = translate(
            unwrapped,
            tokenizer,
            splits["validation"][0],
            accelerator,
            batch_size=training_args.per_device_eval_batch_size,
            num_beams=text_args.eval_num_beams,
            max_new_tokens=text_args.max_source_length,
        )
        scores = score_translations(hypotheses, splits["validation"][1])
        entry = {
            "step": global_step,
            "train_minutes": train_seconds / 60,
            "target_tokens_per_second": target_tokens / max(train_seconds, 1e-9),
            "validation_bleu": scores["bleu"],
            "validation_chrf": scores["chrf"],
            **anchor_statistics,
        }
        history.append(entry)
        logger.info(f"validation: {json.dumps(entry)}")
        if scores["bleu"] > best["bleu"]:
            best.update(bleu=scores["bleu"], step=global_step, state=copy.deepcopy(unwrapped.state_dict()))

    model.train()
    for epoch in range(start_epoch, num_epochs):
        # In a single process the prepared loader passes its own pass count to the sampler, and that count
        # restarts at 0 after resuming, so the loader gets the epoch too. Across processes the sampler sits inside
        # a shard that does not forward `set_epoch`, so the sampler is also set directly.
        train_dataloader.set_epoch(epoch)
        batch_sampler.set_epoch(epoch)
        batches = train_dataloader
        completed_in_epoch = global_step - epoch * steps_per_epoch
        if completed_in_epoch > 0:
            # Resuming mid-epoch: skip the batches the checkpointed run already trained on.
            batches = accelerator.skip_first_batches(
                train_dataloader, completed_in_epoch * training_args.gradient_accumulation_steps
            )

        step_started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch)
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
            target_tokens += int((batch["labels"] != -100).sum()) * accelerator.num_processes

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            anchor_statistics = update_anchors(model, optimizer) or anchor_statistics
            train_seconds += time.perf_counter() - step_started

            if global_step % training_args.logging_steps == 0:
                logs = {**mean_loss_terms(outputs, LOSS_TERMS), **anchor_statistics, "lr": scheduler.get_last_lr()[0]}
                logs["target_tokens_per_second"] = target_tokens / max(train_seconds, 1e-9)
                progress.set_postfix(loss=f"{logs['loss']:.3f}", anchors=logs.get("anchors_in_use", "-"))
                logger.info(f"step {global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                accelerator.log(logs, step=global_step)
            if training_args.save_steps > 0 and global_step % training_args.save_steps == 0:
                save_checkpoint(
                    accelerator, output_dir, global_step, epoch, training_args.save_total_limit, model=model
                )
            # Every process must agree on stopping, so the time limit is read from the main process's clock.
            if text_args.max_train_minutes is not None:
                elapsed = torch.tensor(train_seconds, device=accelerator.device)
                out_of_time = bool(accelerator.reduce(elapsed, reduction="mean") / 60 >= text_args.max_train_minutes)
            if global_step % eval_steps == 0 or global_step >= num_training_steps or out_of_time:
                evaluate_now()
            step_started = time.perf_counter()
            if global_step >= num_training_steps or out_of_time:
                break
        if global_step >= num_training_steps or out_of_time:
            break
    progress.close()
    if not history or history[-1]["step"] != global_step:
        evaluate_now()

    # Final evaluation: the weights with the best validation BLEU translate the test set with beam search.
    checksums = replica_checksums(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best["state"])
    # The best state may come from a step after the last loss check, so it is checked before it is tested or saved.
    check_finite_weights(unwrapped, best["step"])
    test_started = time.perf_counter()
    hypotheses = translate(
        unwrapped,
        tokenizer,
        splits["test"][0],
        accelerator,
        batch_size=training_args.per_device_eval_batch_size,
        num_beams=text_args.test_num_beams,
        max_new_tokens=text_args.max_source_length,
    )
    test_scores = score_translations(hypotheses, splits["test"][1])
    results = {
        **{key: value for key, value in test_scores.items()},
        "test_num_beams": text_args.test_num_beams,
        "test_seconds": time.perf_counter() - test_started,
        "best_step": best["step"],
        "best_validation_bleu": best["bleu"],
        "train_minutes": train_seconds / 60,
        "global_step": global_step,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        # Taken before the best validation weights are loaded, so it compares what every process trained.
        "replica_checksums": checksums,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
    }
    bottleneck = find_bottleneck(unwrapped)
    if bottleneck is not None and bottleneck.has_anchors:
        results["anchors_reseeded"] = int(bottleneck.num_reseeded)

    # The Hub-ready folder: weights, config, generation config, tokenizer, arguments, results and translations.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Saving through the pipeline writes the model, tokenizer, `custom_pipelines` entry and pipeline code.
        NVCTranslationPipeline(model=unwrapped, tokenizer=tokenizer).save_pretrained(output_dir)
        arguments = {"text": asdict(text_args), "nvc": asdict(nvc_args), "training": asdict(training_args)}
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        (output_dir / "results.json").write_text(json.dumps({"test": results, "validation": history}, indent=2))
        (output_dir / "test_translations.txt").write_text("\n".join(hypotheses) + "\n")
        write_translation_model_card(
            output_dir,
            config=config,
            dataset_name="Multi30k"
            if text_args.train_files is None and "multi30k" in text_args.dataset.lower()
            else text_args.dataset,
            results={**results, "split": "test"},
            training_arguments=arguments,
            example=(splits["test"][0][0], hypotheses[0]),
            source_lang=text_args.source_lang,
            target_lang=text_args.target_lang,
            test_subset=describe_test_subset(len(hypotheses), full_test_size, "sentences"),
            test_split="test" if len(hypotheses) == full_test_size else f"test[:{len(hypotheses)}]",
        )
        logger.info(f"test results: {json.dumps(results)}")
        logger.info(f"Model folder written to {output_dir}")
    end_training(accelerator)
    return results


if __name__ == "__main__":
    main()
