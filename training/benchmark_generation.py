"""Measure `generate` speed of the NVC translation model against transformers' MarianMTModel of identical size.

Both models get random weights, the same real German source batch and a fixed output length
(`min_new_tokens == max_new_tokens`), so they do the same amount of decoding work. Runs alternate between the models
and the median of `--repeats` runs is reported, which evens out load from other processes on a shared machine:

    python training/benchmark_generation.py --output_file runs/generation_speed.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, MarianConfig, MarianMTModel


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_ROOT))

from nvc_hf import NVCForConditionalGeneration, NVCTextConfig  # noqa: E402
from nvc_hf.data.parallel_text import load_multi30k  # noqa: E402
from nvc_hf.data.subword import train_joint_tokenizer  # noqa: E402


@dataclass
class BenchmarkArguments:
    """Options of the generation benchmark."""

    batch_size: int = field(default=100, metadata={"help": "Source sentences per generate call."})
    new_tokens: int = field(default=30, metadata={"help": "Tokens generated per sentence (fixed)."})
    repeats: int = field(default=5, metadata={"help": "Timed runs per model and decoding mode."})
    vocab_size: int = field(default=8000, metadata={"help": "Joint vocabulary size of both models."})
    d_model: int = field(default=256, metadata={"help": "Model width."})
    layers: int = field(default=3, metadata={"help": "Encoder and decoder layers."})
    attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    ffn_dim: int = field(default=1024, metadata={"help": "Feed-forward hidden size."})
    output_file: str | None = field(default=None, metadata={"help": "JSON file for the measurements."})


def processor_name() -> str:
    """Return the CPU model from /proc/cpuinfo (Linux), else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_models(args: BenchmarkArguments) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    nvc = NVCForConditionalGeneration(
        NVCTextConfig(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            encoder_layers=args.layers,
            decoder_layers=args.layers,
            attention_heads=args.attention_heads,
            ffn_dim=args.ffn_dim,
        )
    )
    marian = MarianMTModel(
        MarianConfig(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            encoder_layers=args.layers,
            decoder_layers=args.layers,
            encoder_attention_heads=args.attention_heads,
            decoder_attention_heads=args.attention_heads,
            encoder_ffn_dim=args.ffn_dim,
            decoder_ffn_dim=args.ffn_dim,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=1,
            share_encoder_decoder_embeddings=True,
        )
    )
    return {"nvc": nvc.eval(), "marian": marian.eval()}


@torch.no_grad()
def time_generate(model, batch, num_beams: int, new_tokens: int) -> float:
    started = time.perf_counter()
    model.generate(
        **batch,
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        decoder_start_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        forced_eos_token_id=None,
        use_cache=True,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    splits = load_multi30k(REPOSITORY_ROOT / "data" / "multi30k")
    tokenizer = train_joint_tokenizer(splits["train"][0] + splits["train"][1], vocab_size=args.vocab_size)
    batch = tokenizer(splits["test"][0][: args.batch_size], padding=True, return_tensors="pt")
    models = build_models(args)

    results = {
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        # Other processes on the machine change the timings; the load averages show how busy it was.
        "load_average_at_start": os.getloadavg(),
        "settings": vars(args),
    }
    for num_beams in (1, 5):
        for model in models.values():
            time_generate(model, batch, num_beams, 2)  # warm-up
        seconds = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                seconds[name].append(time_generate(model, batch, num_beams, args.new_tokens))
        mode = "greedy" if num_beams == 1 else f"beam{num_beams}"
        output_tokens = args.batch_size * args.new_tokens
        for name in models:
            results[f"{name}_{mode}_tokens_per_second"] = output_tokens / statistics.median(seconds[name])
        results[f"{mode}_speed_ratio_nvc_over_marian"] = (
            results[f"nvc_{mode}_tokens_per_second"] / results[f"marian_{mode}_tokens_per_second"]
        )
        print(json.dumps({key: value for key, value in results.items() if mode in key}))

    results["load_average_at_end"] = os.getloadavg()
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
