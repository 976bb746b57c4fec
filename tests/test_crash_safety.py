"""Crash-safe training: a writer killed mid-save, a real run killed with SIGKILL and resumed, safe state loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPOSITORY_ROOT
from safetensors.torch import load_file
from text_helpers import TOKEN_BATCH_DATA_ARGUMENTS


TRAINING = REPOSITORY_ROOT / "training"
ENVIRONMENT = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPOSITORY_ROOT), str(TRAINING)]),
    "OMP_NUM_THREADS": "1",
}

# Writes checkpoint-1 of a small model, then dies by SIGKILL while writing checkpoint-2: either inside
# `save_state` after a truncated weights file (`during-save`), or after every file but before the rename.
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    import loop
    from accelerate import Accelerator

    output_dir, moment = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    loop.save_checkpoint(accelerator, output_dir, step=1, epoch=0, save_total_limit=2)
    torch.save(model.state_dict(), output_dir / "expected.pt")

    with torch.no_grad():
        model.weight.add_(1.0)
    save_state = accelerator.save_state

    def die_during_save(folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)

    def die_before_rename(source, target):
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "during-save":
        accelerator.save_state = die_during_save
    else:
        loop.os.replace = die_before_rename
    loop.save_checkpoint(accelerator, output_dir, step=2, epoch=0, save_total_limit=2)
    """
)


@pytest.mark.parametrize("moment", ["during-save", "before-rename"])
def test_killed_writer_keeps_previous_checkpoint(tmp_path, moment):
    import loop
    from accelerate import Accelerator

    completed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), moment],
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    assert (tmp_path / ".tmp-checkpoint-2").exists()
    assert not (tmp_path / "checkpoint-2").exists()
    assert loop.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1"]

    # The surviving checkpoint loads and contains the step-1 weights, not the half-written step-2 ones.
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    step, epoch = loop.resume_from_checkpoint(accelerator, "latest", tmp_path)
    assert (step, epoch) == (1, 0)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    # The next save replaces the leftover temporary folder.
    loop.save_checkpoint(accelerator, tmp_path, step=2, epoch=0, save_total_limit=2)
    assert not (tmp_path / ".tmp-checkpoint-2").exists()
    assert loop.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]


# Small runs of the three training scripts on real data, with a checkpoint every 3 steps.
KILLED_RUNS = {
    "image": (
        "train_image.py",
        [
            "--max_train_samples", "600",
            "--max_eval_samples", "100",
            "--per_device_train_batch_size", "32",
            "--conv_channels", "8,16",
            "--hidden_size", "32",
            "--latent_size", "8",
            "--num_anchors", "6",
        ],
    ),
    "points": (
        "train_points.py",
        [
            "--point_mlp_sizes", "16,32",
            "--hidden_size", "32",
            "--latent_size", "8",
            "--num_anchors", "6",
            "--max_eval_samples", "20",
            "--per_device_train_batch_size", "32",
            "--reconstruction_weight", "0",
        ],
    ),
    "translation": (
        "train_translation.py",
        [
            *TOKEN_BATCH_DATA_ARGUMENTS,
            "--d_model", "32",
            "--encoder_layers", "1",
            "--decoder_layers", "1",
            "--attention_heads", "4",
            "--ffn_dim", "64",
            "--latent_size", "16",
            "--num_anchors", "6",
        ],
    ),
}  # fmt: skip
COMMON = [
    "--max_steps", "30",
    "--save_steps", "3",
    "--save_total_limit", "20",
    "--anchor_warmup_ratio", "0.2",
    "--seed", "11",
    "--logging_steps", "10",
    "--disable_tqdm", "true",
]  # fmt: skip


def script_arguments(head: str, output_dir: Path, *extra: str) -> list[str]:
    script, arguments = KILLED_RUNS[head]
    return [sys.executable, str(TRAINING / script), "--output_dir", str(output_dir), *arguments, *COMMON, *extra]


def wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, timeout: float) -> Path:
    """Poll until a complete checkpoint exists, then SIGKILL the process; return that checkpoint."""
    import loop

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoints = loop.list_checkpoints(output_dir) if output_dir.exists() else []
        if checkpoints:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return checkpoints[0]
        if process.poll() is not None:
            break
        time.sleep(0.01)
    process.kill()
    _, errors = process.communicate(timeout=60)
    raise AssertionError(f"no checkpoint appeared (exit code {process.returncode}): {errors[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("head", list(KILLED_RUNS))
def test_sigkilled_run_resumes_to_same_weights(tmp_path, head):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        script_arguments(head, killed), env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first_checkpoint = wait_for_checkpoint(process, killed, timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    step_at_kill = max(int(path.name.split("-")[1]) for path in killed.glob("checkpoint-*"))
    assert step_at_kill < 30
    assert first_checkpoint.name == "checkpoint-3"

    resume = subprocess.run(
        script_arguments(head, killed, "--resume_from_checkpoint", "latest"),
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"at step {step_at_kill}" in resume.stderr

    uninterrupted = tmp_path / "uninterrupted"
    complete = subprocess.run(
        script_arguments(head, uninterrupted), env=ENVIRONMENT, capture_output=True, text=True, timeout=600
    )
    assert complete.returncode == 0, complete.stderr[-3000:]

    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_loads_state_with_weights_only(tmp_path, monkeypatch):
    """Optimizer, scheduler, sampler and RNG state are unpickled with `weights_only=True`; weights via safetensors."""
    import loop
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    loop.save_checkpoint(accelerator, tmp_path, step=1, epoch=0, save_total_limit=1)
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "model.safetensors").exists()
    assert not list(checkpoint.glob("pytorch_model*"))

    calls = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append((Path(str(args[0])).name, kwargs.get("weights_only")))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    loop.resume_from_checkpoint(accelerator, str(checkpoint), tmp_path)
    loaded = {name for name, _ in calls}
    assert {"optimizer.bin", "scheduler.bin"} <= loaded
    assert not any(name.startswith("model") for name in loaded)
    for name, weights_only in calls:
        assert weights_only is True, name
