"""Shared fixtures: a small NVC image model trained on real MNIST by the training script itself."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
MNIST_FOLDER = REPOSITORY_ROOT / "data" / "mnist"
sys.path.insert(0, str(REPOSITORY_ROOT / "training"))

# Nothing in the tests may reach the network; remote code is cached under HF_HOME, which must be writable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="nvc-hf-test-home-")


@pytest.fixture(scope="session")
def mnist_test_digits():
    """The first 200 images of the real MNIST test set as `(images uint8 (n, 28, 28), labels)`."""
    from nvc_hf.data import load_mnist

    images, labels = load_mnist(MNIST_FOLDER, "test")
    return np.ascontiguousarray(images[:200]), labels[:200]


@pytest.fixture(scope="session")
def trained_image_folder(tmp_path_factory) -> Path:
    """Train an NVC image model for 200 steps on 12,000 real MNIST images and return its output folder."""
    import train_image

    output_dir = tmp_path_factory.mktemp("mnist-nvc")
    train_image.main(
        [
            "--output_dir", str(output_dir),
            "--max_steps", "200",
            "--max_train_samples", "12000",
            "--max_eval_samples", "1000",
            "--save_steps", "0",
            "--logging_steps", "50",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    return output_dir
