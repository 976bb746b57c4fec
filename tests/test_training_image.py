"""The image training script on real MNIST: label-free anchor health, two processes, resuming, argument errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import train_image
from conftest import REPOSITORY_ROOT
from safetensors.torch import load_file


SMALL_RUN = [
    "--max_train_samples",
    "3000",
    "--max_eval_samples",
    "500",
    "--logging_steps",
    "5",
    "--disable_tqdm",
    "true",
]


def test_label_free_epoch_uses_half_the_anchors(tmp_path):
    # Without the warm-up and k-means initialisation, label-free NVC collapses onto one or two anchors in the
    # first epoch. This run is one full epoch over the real MNIST training set.
    results = train_image.main(
        [
            "--output_dir", str(tmp_path),
            "--label_free", "true",
            "--num_train_epochs", "1",
            "--per_device_train_batch_size", "256",
            "--learning_rate", "1e-3",
            "--max_eval_samples", "2000",
            "--save_steps", "0",
            "--logging_steps", "50",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert results["global_step"] == 215
    assert results["anchors_in_use"] >= 15
    assert results["final_anchors_in_use"] >= 15
    assert results["final_largest_anchor_share"] < 0.5


def test_two_processes_keep_identical_weights(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPOSITORY_ROOT / "training" / "train_image.py"),
        "--output_dir", str(tmp_path),
        "--max_steps", "12",
        "--per_device_train_batch_size", "32",
        "--anchor_warmup_ratio", "0.25",
        "--save_steps", "0",
        *SMALL_RUN,
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())["test"]
    assert results["num_processes"] == 2
    checksums = results["replica_checksums"]
    assert len(checksums) == 2
    assert checksums[0] == checksums[1]
    assert results["final_anchors_initialized"] == 1.0


def train_steps(output_dir, extra: list[str]) -> dict:
    return train_image.main(
        [
            "--output_dir", str(output_dir),
            "--max_steps", "16",
            "--per_device_train_batch_size", "64",
            "--anchor_warmup_ratio", "0.25",
            "--save_steps", "8",
            "--seed", "7",
            *SMALL_RUN,
            *extra,
        ]
    )  # fmt: skip


def test_resume_reaches_same_weights(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    train_steps(uninterrupted, [])

    resumed = tmp_path / "resumed"
    train_steps(resumed, [])
    # Resume the second run from its step-8 checkpoint: it must retrain steps 9-16 on the same batches.
    train_steps(resumed, ["--resume_from_checkpoint", str(resumed / "checkpoint-8")])

    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_latest_picks_newest_checkpoint(tmp_path):
    train_steps(tmp_path, [])
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    results = train_steps(tmp_path, ["--resume_from_checkpoint", "latest"])
    assert results["global_step"] == 16


def test_resume_from_missing_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train_steps(tmp_path, ["--resume_from_checkpoint", str(tmp_path / "checkpoint-3")])


def test_unwritable_output_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="Cannot write to --output_dir"):
        train_image.main(["--output_dir", str(blocker / "model"), "--max_steps", "1"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        (["--nebula_radius", "far"], "--nebula_radius must be a positive number or 'auto'"),
        (["--anchor_warmup_ratio", "1.5"], r"--anchor_warmup_ratio must be in \[0, 1\)"),
        (["--kl_prior", "uniform"], "kl_prior='uniform' is not supported"),
    ],
)
def test_invalid_arguments(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        train_image.main(["--output_dir", str(tmp_path), "--max_steps", "1", *SMALL_RUN, *arguments])


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_image.main(["--output_dir", str(tmp_path), "--dataset", str(tmp_path / "nowhere"), "--max_steps", "1"])


def test_datasets_folder_trains(tmp_path, mnist_test_digits):
    # Any `datasets` dataset with image and label columns works, here a save_to_disk folder of real digits.
    import datasets
    from PIL import Image

    images, labels = mnist_test_digits
    features = datasets.Features(
        {"picture": datasets.Image(), "digit": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    rows = {"picture": [Image.fromarray(image) for image in images], "digit": [int(label) for label in labels]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split.select(range(50))}).save_to_disk(tmp_path / "digits")

    results = train_image.main(
        [
            "--output_dir", str(tmp_path / "model"),
            "--dataset", str(tmp_path / "digits"),
            "--image_column", "picture",
            "--label_column", "digit",
            "--validation_size", "40",
            "--max_steps", "3",
            "--per_device_train_batch_size", "32",
            "--save_steps", "0",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert results["global_step"] == 3
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"]["7"] == "7"


def test_datasets_folder_with_wrong_column(tmp_path, mnist_test_digits):
    import datasets

    images, labels = mnist_test_digits
    split = datasets.Dataset.from_dict({"image": list(images[:20]), "label": [int(x) for x in labels[:20]]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "digits")
    with pytest.raises(ValueError, match="Column 'digit' not found"):
        train_image.main(
            ["--output_dir", str(tmp_path / "m"), "--dataset", str(tmp_path / "digits"), "--label_column", "digit"]
        )


def test_random_shift_moves_pixels_within_range():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28)
    images[:, :, 10, 10] = 1.0
    shifted = train_image.shift_randomly(images, 2)
    assert shifted.shape == images.shape
    positions = torch.stack([(image[0] == 1).nonzero()[0] for image in shifted])
    assert (positions - 10).abs().max() <= 2
    assert len({tuple(position.tolist()) for position in positions}) > 5
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
