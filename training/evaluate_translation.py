"""Translate a split with a trained model and score it with sacreBLEU (BLEU, tokenizer 13a, and chrF).

Hypotheses are decoded by the tokenizer (detokenised text) and scored against the raw reference lines. The script
runs on one process or several. Every process translates an interleaved share of the sentences, and the shares are
put back in order, so the score does not depend on the process count:

    python training/evaluate_translation.py --model runs/multi30k-nvc --split test
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no training/evaluate_translation.py --model runs/multi30k-nvc
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
# A saved tokenizer folder contains at least one of these (fast tokenizers write both).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
sys.path.insert(0, str(REPOSITORY_ROOT))

from nvc_hf.data.parallel_text import load_multi30k, read_parallel_files  # noqa: E402


logger = get_logger(__name__)


@dataclass
class EvaluationArguments:
    """Options of the evaluation script."""

    model: str = field(metadata={"help": "Model folder with config, weights and tokenizer."})
    split: str = field(default="test", metadata={"help": "Multi30k split: train, validation or test."})
    dataset: str = field(default=str(REPOSITORY_ROOT / "data" / "multi30k"), metadata={"help": "Multi30k folder."})
    source_file: str | None = field(default=None, metadata={"help": "Source text file (overrides --split)."})
    reference_file: str | None = field(default=None, metadata={"help": "Reference text file for --source_file."})
    num_beams: int = field(default=5, metadata={"help": "Beam size; 1 is greedy search."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest translation in tokens."})
    batch_size: int = field(default=64, metadata={"help": "Sentences per generate call and process."})
    max_samples: int | None = field(default=None, metadata={"help": "Score only the first N sentences."})
    output_file: str | None = field(
        default=None, metadata={"help": "JSON file for scores and signatures (default: <model>/eval_<split>.json)."}
    )


def score_translations(hypotheses: list[str], references: list[str]) -> dict:
    """Score detokenised hypotheses against raw references with sacreBLEU BLEU (13a) and chrF.

    Returns the scores and their signatures. Raises `ValueError` if the lists differ in length, because sacreBLEU
    would otherwise score a shifted or truncated pairing.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"Got {len(hypotheses)} hypotheses but {len(references)} references; every reference needs exactly one "
            "hypothesis in the same order."
        )
    if not references:
        raise ValueError("No references to score against; pass at least one sentence.")
    bleu = sacrebleu.metrics.BLEU(tokenize="13a")
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": str(bleu_score),
        "num_sentences": len(references),
    }


@torch.no_grad()
def translate_share(
    model, tokenizer, sentences: list[str], rank: int = 0, world_size: int = 1, batch_size: int = 64, **generate_kwargs
) -> list[tuple[int, str]]:
    """Translate the share of process `rank` out of `world_size`: sentences `rank, rank + world_size, ...`.

    Returns `(index, translation)` pairs with detokenised translations.
    """
    indices = list(range(rank, len(sentences), world_size))
    # Sorting by length keeps padding, and so wasted computation, small.
    indices.sort(key=lambda index: len(sentences[index]))

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    translated = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = tokenizer(
            [sentences[index] for index in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=model.config.max_position_embeddings,
        ).to(device)
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **generate_kwargs
        )
        translated.extend(zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)))
    model.train(was_training)
    return translated


def merge_shares(translated: list[tuple[int, str]], count: int) -> list[str]:
    """Put `(index, translation)` pairs gathered from all processes back into input order.

    Raises `ValueError` if an index is missing or repeated, so a sharding error cannot shift the scores.
    """
    ordered = dict(translated)
    if len(ordered) != len(translated) or sorted(ordered) != list(range(count)):
        raise ValueError(
            f"Gathered {len(translated)} translations for {len(ordered)} distinct indices, expected each of "
            f"0..{count - 1} exactly once."
        )
    return [ordered[index] for index in range(count)]


def translate(
    model,
    tokenizer,
    sentences: list[str],
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    **generate_kwargs,
) -> list[str]:
    """Translate `sentences` with `model.generate`; return detokenised translations in the input order.

    With several processes each translates an interleaved share (see [`translate_share`]), and the shares are
    gathered and merged, so no sentence is duplicated or dropped whatever the count.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world_size = accelerator.num_processes if accelerator is not None else 1
    translated = translate_share(model, tokenizer, sentences, rank, world_size, batch_size, **generate_kwargs)
    if world_size > 1:
        translated = gather_object(translated)
    return merge_shares(translated, len(sentences))


def load_split(args: EvaluationArguments) -> tuple[list[str], list[str], str]:
    if args.source_file or args.reference_file:
        if not (args.source_file and args.reference_file):
            raise ValueError("Pass both --source_file and --reference_file.")
        sources, references = read_parallel_files(args.source_file, args.reference_file)
        return sources, references, Path(args.source_file).name
    splits = load_multi30k(args.dataset)
    if args.split not in splits:
        raise ValueError(f"--split must be one of {', '.join(splits)}, got {args.split!r}.")
    sources, references = splits[args.split]
    return sources, references, args.split


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()

    sources, references, name = load_split(args)
    if args.max_samples is not None:
        sources, references = sources[: args.max_samples], references[: args.max_samples]
    model_folder = Path(args.model)
    if model_folder.is_dir() and not any((model_folder / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"--model {model_folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it into the "
            "folder with tokenizer.save_pretrained, as train_translation.py does."
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=torch.float32).to(accelerator.device)

    started = time.perf_counter()
    hypotheses = translate(
        model,
        tokenizer,
        sources,
        accelerator,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
    )
    results = score_translations(hypotheses, references)
    results.update({"split": name, "num_beams": args.num_beams, "seconds": time.perf_counter() - started})

    if accelerator.is_main_process:
        print(results["bleu_details"])
        print(f"chrF2 = {results['chrf']:.2f}")
        print(f"BLEU signature: {results['bleu_signature']}")
        print(f"chrF signature: {results['chrf_signature']}")
        output_file = Path(args.output_file or Path(args.model) / f"eval_{name}.json")
        output_file.write_text(json.dumps({**results, "hypotheses": hypotheses}, indent=2, ensure_ascii=False))
        logger.info(f"Scores and translations written to {output_file}")
    return results


if __name__ == "__main__":
    main()
