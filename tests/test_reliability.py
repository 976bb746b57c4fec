"""Numerical safety of the bottleneck and the imports of the files exported as Hub remote code."""

import ast
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvc_hf import NVCBottleneck, NVCForImageClassification, NVCVisionConfig


PACKAGE = Path(__file__).resolve().parents[1] / "nvc_hf"
REMOTE_CODE_FILES = sorted(
    [*PACKAGE.glob("configuration_*.py"), *PACKAGE.glob("modeling_*.py"), *PACKAGE.glob("image_processing_*.py")]
    + [PACKAGE / "nebula.py"]
)
NETWORK_MODULES = {"socket", "urllib", "http", "requests", "httpx", "ftplib", "smtplib", "subprocess"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", REMOTE_CODE_FILES, ids=[path.name for path in REMOTE_CODE_FILES])
def test_remote_code_imports_only_allowed_modules(path):
    # These files run on users' machines through trust_remote_code: torch, transformers, the standard library and
    # numpy (which transformers itself needs) only, and nothing that opens a connection or a process.
    allowed = {"torch", "transformers", "numpy", "__future__"} | set(sys.stdlib_module_names)
    roots = imported_roots(path)
    assert roots <= allowed, roots - allowed
    assert not roots & NETWORK_MODULES, roots & NETWORK_MODULES


@pytest.mark.parametrize("path", REMOTE_CODE_FILES, ids=[path.name for path in REMOTE_CODE_FILES])
def test_remote_code_uses_flat_sibling_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1 and "." not in (node.module or ""), (
                f"{path.name}: from {'.' * node.level}{node.module}"
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_losses_and_gradients_finite(dtype):
    torch.manual_seed(0)
    model = NVCForImageClassification(
        NVCVisionConfig(conv_channels=[4, 8], hidden_size=16, latent_size=8, num_anchors=5)
    )
    model.bottleneck.anchors_initialized.fill_(True)
    with torch.autocast("cpu", dtype=dtype):
        output = model(pixel_values=torch.rand(16, 1, 28, 28), labels=torch.randint(0, 10, (16,)))
    output.loss.backward()
    for name in ("loss", "kl_loss", "nebula_loss", "metric_loss", "reconstruction_loss", "classification_loss"):
        assert torch.isfinite(getattr(output, name)), name
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_single_anchor_batch_losses_finite():
    # All latents on one anchor: the metric loss has no negatives and is zero; nothing is NaN.
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=3)
    with torch.no_grad():
        bottleneck.anchors.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0]]))
        bottleneck.anchors_initialized.fill_(True)
    output = bottleneck(torch.randn(32, 4) * 0.01)
    output.loss.backward()
    assert (output.assignments == 0).all()
    assert output.metric_loss.item() == 0.0
    assert torch.isfinite(output.loss)
    assert torch.isfinite(bottleneck.anchors.grad).all()


def test_far_anchors_clamp_nebula_is_zero():
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=2, nebula_distance="clamp", nebula_radius=1.0)
    with torch.no_grad():
        bottleneck.anchors.copy_(torch.tensor([[0.0, 0.0], [100.0, 0.0]]))
        bottleneck.anchors_initialized.fill_(True)
    output = bottleneck(torch.randn(8, 4))
    assert output.nebula_loss.item() == 0.0


def test_all_padding_sequence_is_finite():
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=3)
    bottleneck.anchors_initialized.fill_(True)
    output = bottleneck(torch.randn(2, 3, 4), attention_mask=torch.zeros(2, 3))
    assert (output.assignments == -1).all()
    for name in ("loss", "kl_loss", "nebula_loss", "metric_loss"):
        assert getattr(output, name).item() == 0.0, name


def non_finite_tensors(folder: Path) -> list[str]:
    """List as `file:key` each floating-point tensor holding NaN or infinity in the safetensors under `folder`."""
    found = []
    for path in sorted(folder.rglob("*.safetensors")):
        for key, tensor in load_file(path).items():
            if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
                found.append(f"{path.relative_to(folder).as_posix()}:{key}")
    return found


def test_non_finite_tensors_finds_nan_checkpoint(tmp_path):
    # The check the high-learning-rate test relies on: it must see a NaN checkpoint if one is written.
    (tmp_path / "checkpoint-2").mkdir()
    weights = {"weight": torch.tensor([1.0, float("nan")]), "bias": torch.zeros(2), "step": torch.tensor([2])}
    save_file(weights, tmp_path / "checkpoint-2" / "model.safetensors")
    save_file({"weight": torch.tensor([float("inf")])}, tmp_path / "model.safetensors")
    assert non_finite_tensors(tmp_path) == ["checkpoint-2/model.safetensors:weight", "model.safetensors:weight"]


def test_save_checkpoint_rejects_nan_weights(tmp_path):
    from accelerate import Accelerator
    from loop import list_checkpoints, save_checkpoint

    model = torch.nn.Linear(3, 2)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    save_checkpoint(accelerator, tmp_path, step=1, epoch=0, save_total_limit=2, model=model)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 2 \(weight\).*--learning_rate"):
        save_checkpoint(accelerator, tmp_path, step=2, epoch=0, save_total_limit=2, model=model)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1"]


# Learning rate 10 with AdamW made the MNIST model's loss NaN at step 2 (torch 2.13 on a 2-core CPU machine).
HIGH_LEARNING_RATE = "10"


@pytest.mark.slow
def test_high_learning_rate_saves_nothing_non_finite(tmp_path, caplog):
    import train_image

    # A checkpoint after every step, so any non-finite state reached by an optimizer step would be a candidate.
    output_dir = tmp_path / "run"
    arguments = [
        "--output_dir", str(output_dir),
        "--learning_rate", HIGH_LEARNING_RATE,
        "--max_steps", "300",
        "--max_train_samples", "3000",
        "--validation_size", "200",
        "--max_eval_samples", "200",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "200",
        "--eval_steps", "100000",
        "--save_steps", "1",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    caplog.set_level(logging.INFO, logger="train_image")
    try:
        results = train_image.main(arguments)
    except FloatingPointError as error:
        stopped = error
    else:
        stopped = None

    logged_losses = [float(match.group(1)) for match in re.finditer(r"step \d+: loss=(\S+?),", caplog.text)]
    assert logged_losses, "no training step was logged"
    assert all(math.isfinite(loss) for loss in logged_losses), logged_losses
    assert non_finite_tensors(output_dir) == []
    if stopped is not None:
        # Stopped: the error names the setting to lower, and no model folder was written.
        assert "--learning_rate" in str(stopped)
        assert not (output_dir / "model.safetensors").exists()
        assert not (output_dir / "config.json").exists()
    else:
        # Finished: every step ran and the saved model is finite.
        assert results["global_step"] == 300
        assert (output_dir / "model.safetensors").exists()
        assert (output_dir / "checkpoint-300" / "model.safetensors").exists()


# Calls that would reach the network or run other programs, by the name they are called with.
NETWORK_CALLS = {"urlopen", "hf_hub_download", "snapshot_download", "create_connection", "system", "popen", "Popen"}


def exported_folder(tmp_path: Path, head: str) -> Path:
    from nvc_hf import NVCForConditionalGeneration, NVCForPointCloudClassification, NVCPointConfig, NVCTextConfig

    models = {
        "vision": lambda: NVCForImageClassification(NVCVisionConfig(conv_channels=[4, 8], hidden_size=16)),
        "point": lambda: NVCForPointCloudClassification(NVCPointConfig(point_mlp_sizes=[8], hidden_size=16)),
        "text": lambda: NVCForConditionalGeneration(
            NVCTextConfig(vocab_size=40, d_model=16, attention_heads=2, ffn_dim=32, latent_size=8)
        ),
    }
    folder = tmp_path / head
    models[head]().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("head", ["vision", "point", "text"])
def test_exported_folder_is_safe(tmp_path, head):
    folder = exported_folder(tmp_path, head)
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

    code_files = sorted(folder.glob("*.py"))
    assert {f"configuration_nvc_{head}.py", f"modeling_nvc_{head}.py", "nebula.py"} <= {p.name for p in code_files}
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in code_files:
        roots = imported_roots(path)
        assert roots <= allowed, (path.name, roots - allowed)
        assert not roots & NETWORK_MODULES, (path.name, roots & NETWORK_MODULES)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                assert name not in NETWORK_CALLS, (path.name, node.lineno, name)
                assert name not in ("eval", "exec", "__import__"), (path.name, node.lineno, name)
