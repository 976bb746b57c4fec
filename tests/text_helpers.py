"""Shared, cached set-up for the translation tests: real Multi30k pairs, a tokenizer and a small trained model.

Plain functions with `functools.cache` (not fixtures), so every test module reuses one tokenizer and one model.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
MULTI30K_FOLDER = REPOSITORY_ROOT / "data" / "multi30k"
sys.path.insert(0, str(REPOSITORY_ROOT / "training"))

# Nothing in the tests may reach the network; remote code is cached under HF_HOME, which must be writable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Small enough for the test time budget, large enough that training visibly lowers the loss.
# 120 real sentence pairs in batches of at most 256 tokens, with a 400-token vocabulary.
TOKEN_BATCH_DATA_ARGUMENTS = [
    "--max_train_samples", "120",
    "--max_eval_samples", "4",
    "--max_test_samples", "4",
    "--vocab_size", "400",
    "--max_source_length", "24",
    "--max_tokens", "256",
]  # fmt: skip
TINY_MODEL_ARGUMENTS = [
    "--d_model", "64",
    "--encoder_layers", "2",
    "--decoder_layers", "2",
    "--attention_heads", "4",
    "--ffn_dim", "128",
    "--latent_size", "32",
    "--num_anchors", "8",
]  # fmt: skip
# One thread: the test models are so small that a second thread mostly adds synchronisation, and on a busy
# 2-core machine one thread ran the tiny training 4 times faster than two.
TEST_THREADS = 1


@pytest.fixture(autouse=True)
def single_threaded_torch():
    """Run each test with `TEST_THREADS` torch threads and restore the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(previous)


GERMAN_SENTENCE = "Ein Mann mit einem orangefarbenen Hut starrt auf etwas."


@functools.cache
def multi30k_pairs(split: str = "train", count: int = 400) -> tuple[list[str], list[str]]:
    """The first `count` German-English pairs of a real Multi30k split."""
    from nvc_hf.data.parallel_text import load_multi30k

    sources, targets = load_multi30k(MULTI30K_FOLDER)[split]
    return sources[:count], targets[:count]


@functools.cache
def tiny_tokenizer():
    """A 1000-token joint BPE trained on 3000 real Multi30k training pairs."""
    from nvc_hf.data.subword import train_joint_tokenizer

    sources, targets = multi30k_pairs("train", 3000)
    return train_joint_tokenizer(sources + targets, vocab_size=1000)


@functools.cache
def trained_text_folder() -> Path:
    """Train a tiny NVC translation model on 1000 real pairs with the training script; return its folder."""
    import train_translation

    output_dir = Path(tempfile.mkdtemp(prefix="multi30k-tiny-"))
    train_translation.main(
        [
            "--output_dir", str(output_dir),
            "--max_train_samples", "1000",
            "--max_eval_samples", "20",
            "--max_test_samples", "20",
            "--vocab_size", "1000",
            "--max_tokens", "1024",
            "--max_steps", "150",
            "--eval_steps", "75",
            "--learning_rate", "3e-3",
            "--lr_scheduler_type", "inverse_sqrt",
            "--save_steps", "0",
            "--logging_steps", "75",
            "--disable_tqdm", "true",
            "--test_num_beams", "1",
            "--per_device_eval_batch_size", "250",
            *TINY_MODEL_ARGUMENTS,
        ]
    )  # fmt: skip
    return output_dir


def tiny_config(**overrides):
    """An `NVCTextConfig` with the tiny sizes and the tokenizer's vocabulary."""
    from nvc_hf import NVCTextConfig

    settings = dict(
        vocab_size=len(tiny_tokenizer()),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        attention_heads=4,
        ffn_dim=128,
        latent_size=32,
        num_anchors=8,
    )
    settings.update(overrides)
    return NVCTextConfig(**settings)
