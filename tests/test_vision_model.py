"""The image head: config validation, input checks, save/load, remote code, pipeline and Trainer."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

from nvc_hf import NVCForImageClassification, NVCImageProcessor, NVCVisionConfig, NVCVisionModel


def tiny_config(**overrides) -> NVCVisionConfig:
    settings = {"conv_channels": [4, 8], "hidden_size": 16, "latent_size": 4, "num_anchors": 3, "dropout": 0.0}
    settings.update(overrides)
    return NVCVisionConfig(**settings)


def as_pixel_values(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images[:, None].astype(np.float32) / 255.0)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    ({"num_anchors": 1}, "num_anchors", "1"),
    ({"num_anchors": 2.5}, "num_anchors", "2.5"),
    ({"latent_size": 0}, "latent_size", "0"),
    ({"hidden_size": -3}, "hidden_size", "-3"),
    ({"conv_channels": [8, 0]}, r"conv_channels\[1\]", "0"),
    ({"image_size": 30}, "image_size", "30"),
    ({"kl_weight": -1.0}, "kl_weight", "-1.0"),
    ({"nebula_weight": float("nan")}, "nebula_weight", "nan"),
    ({"metric_weight": "high"}, "metric_weight", "high"),
    ({"reconstruction_weight": -0.5}, "reconstruction_weight", "-0.5"),
    ({"kl_prior": "gaussian"}, "kl_prior", "gaussian"),
    ({"metric_loss": "contrastive"}, "metric_loss", "contrastive"),
    ({"nebula_distance": "inverse"}, "nebula_distance", "inverse"),
    ({"mass_reduction": "max"}, "mass_reduction", "max"),
    ({"bottleneck_type": "vq"}, "bottleneck_type", "vq"),
    ({"nebula_radius": 0.0}, "nebula_radius", "0.0"),
    ({"nebula_radius": "wide"}, "nebula_radius", "wide"),
    ({"dropout": 1.0}, "dropout", "1.0"),
    ({"num_labels": 1}, "num_labels", "1"),
]


@pytest.mark.parametrize("overrides, field, value", CONFIG_ERRORS, ids=[str(case[0]) for case in CONFIG_ERRORS])
def test_config_rejects_invalid_value(overrides, field, value):
    with pytest.raises(ValueError, match=field) as raised:
        NVCVisionConfig(**overrides)
    assert value in str(raised.value)


def test_config_error_lists_allowed_values():
    with pytest.raises(ValueError, match="'standard', 'anchor'"):
        NVCVisionConfig(kl_prior="normal")


def test_config_round_trip(tmp_path):
    config = tiny_config(kl_prior="standard", nebula_radius=0.5, num_labels=4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NVCVisionConfig)
    assert loaded.nvc_settings() == config.nvc_settings()
    assert loaded.num_labels == 4


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

INPUT_ERRORS = [
    (torch.rand(2, 28, 28), ValueError, r"\(batch, 1, 28, 28\)"),
    (torch.rand(2, 3, 28, 28), ValueError, r"got \(2, 3, 28, 28\)"),
    (torch.rand(2, 1, 32, 32), ValueError, r"got \(2, 1, 32, 32\)"),
    (torch.rand(0, 1, 28, 28), ValueError, "empty batch"),
    (torch.randint(0, 255, (2, 1, 28, 28)), TypeError, "image processor"),
    (torch.full((2, 1, 28, 28), float("nan")), ValueError, "NaN"),
]


@pytest.mark.parametrize(
    "pixel_values, error, message", INPUT_ERRORS, ids=["rank3", "rgb", "32px", "empty", "int", "nan"]
)
def test_model_rejects_bad_pixel_values(pixel_values, error, message):
    model = NVCForImageClassification(tiny_config())
    with pytest.raises(error, match=message):
        model(pixel_values=pixel_values)


def test_reconstruction_needs_unit_range():
    model = NVCForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model(pixel_values=torch.rand(2, 1, 28, 28) * 4 - 2)


def test_labels_out_of_range():
    model = NVCForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model(pixel_values=torch.rand(2, 1, 28, 28), labels=torch.tensor([3, 10]))


def test_batch_of_one():
    model = NVCForImageClassification(tiny_config())
    model.bottleneck.anchors_initialized.fill_(True)
    output = model(pixel_values=torch.rand(1, 1, 28, 28), labels=torch.tensor([3]))
    assert torch.isfinite(output.loss)
    assert output.logits.shape == (1, 10)


# ---------------------------------------------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------------------------------------------


def test_disabled_nvc_has_no_anchor_parameters():
    model = NVCForImageClassification(tiny_config(bottleneck_type="none"))
    names = [name for name, _ in model.named_parameters()]
    assert not any("anchor" in name or "logvar" in name for name in names)
    output = model(pixel_values=torch.rand(4, 1, 28, 28), labels=torch.tensor([0, 1, 2, 3]))
    expected = output.classification_loss + model.config.reconstruction_weight * output.reconstruction_loss
    assert torch.allclose(output.loss, expected)
    assert output.assignments is None


def test_disabled_nvc_keeps_the_network_shape():
    with_nvc = NVCForImageClassification(tiny_config())
    without = NVCForImageClassification(tiny_config(bottleneck_type="none"))
    nvc_only = {
        "nvc.bottleneck.anchors",
        "nvc.bottleneck.logvar_projection.weight",
        "nvc.bottleneck.logvar_projection.bias",
    }
    with_shapes = {name: p.shape for name, p in with_nvc.named_parameters() if name not in nvc_only}
    assert with_shapes == {name: p.shape for name, p in without.named_parameters()}


def test_zero_reconstruction_weight_builds_no_decoder():
    model = NVCForImageClassification(tiny_config(reconstruction_weight=0.0))
    assert model.decoder is None
    assert model(pixel_values=torch.rand(2, 1, 28, 28)).reconstruction_loss is None
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(torch.zeros(1, 4))


def test_samples_around_anchors_are_images():
    model = NVCForImageClassification(tiny_config()).eval()
    images = model.sample_around_anchors(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 5, 1, 28, 28)
    assert images.min() >= 0
    assert images.max() <= 1


def test_vision_model_outputs(mnist_test_digits):
    images, _ = mnist_test_digits
    model = NVCVisionModel(tiny_config()).eval()
    output = model(pixel_values=as_pixel_values(images[:8]))
    assert output.latents.shape == (8, 4)
    assert output.assignments.shape == (8,)
    assert output.anchor_distances.shape == (8, 3)
    assert torch.equal(output.latents, output.mean)


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading and remote code
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_is_bit_exact(trained_image_folder):
    model = AutoModelForImageClassification.from_pretrained(trained_image_folder, dtype=torch.float32)
    reloaded_folder = trained_image_folder.parent / "resaved"
    model.save_pretrained(reloaded_folder)
    reloaded = NVCForImageClassification.from_pretrained(reloaded_folder, dtype=torch.float32)

    assert isinstance(model, NVCForImageClassification)
    assert bool(model.bottleneck.anchors_initialized)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name


def test_anchors_survive_loading_fresh_model(tmp_path):
    model = NVCForImageClassification(tiny_config())
    with torch.no_grad():
        model.bottleneck.anchors.copy_(torch.arange(12, dtype=torch.float32).view(3, 4))
    model.save_pretrained(tmp_path)
    loaded = NVCForImageClassification.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.bottleneck.anchors, model.bottleneck.anchors)


def test_auto_model_loads_base_model(trained_image_folder):
    model = AutoModel.from_pretrained(trained_image_folder, dtype=torch.float32)
    assert isinstance(model, NVCVisionModel)
    classifier = NVCForImageClassification.from_pretrained(trained_image_folder, dtype=torch.float32)
    assert torch.equal(model.bottleneck.anchors, classifier.bottleneck.anchors)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "nvc_hf" or name.startswith("nvc_hf."):
                raise ImportError("nvc_hf is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    try:
        import nvc_hf  # noqa: F401
        raise SystemExit("nvc_hf should not be importable here")
    except ImportError:
        pass

    import numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder, images_path, output_path = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.fromarray(image) for image in np.load(images_path)]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    np.save(output_path, logits.numpy())
    print(json.dumps({"model": type(model).__module__, "processor": type(processor).__module__}))
    """
)


def test_remote_code_loads_without_package(trained_image_folder, mnist_test_digits, tmp_path):
    images, _ = mnist_test_digits
    np.save(tmp_path / "images.npy", images[:16])
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    completed = subprocess.run(
        [
            sys.executable,
            str(script),
            str(trained_image_folder),
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    modules = json.loads(completed.stdout.strip().splitlines()[-1])
    assert modules["model"].startswith("transformers_modules")
    assert modules["processor"].startswith("transformers_modules")

    model = NVCForImageClassification.from_pretrained(trained_image_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(pixel_values=as_pixel_values(images[:16])).logits.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_saved_folder_has_auto_map_files(trained_image_folder):
    config = json.loads((trained_image_folder / "config.json").read_text())
    for reference in config["auto_map"].values():
        module = reference.split(".")[0]
        assert (trained_image_folder / f"{module}.py").exists(), module
    assert (trained_image_folder / "nebula.py").exists()


# ---------------------------------------------------------------------------------------------------------------
# Image processor and pipeline
# ---------------------------------------------------------------------------------------------------------------


def test_image_processor_converts_rgb_to_grayscale(mnist_test_digits):
    images, _ = mnist_test_digits
    processor = NVCImageProcessor()
    gray = processor(Image.fromarray(images[0]), return_tensors="pt")["pixel_values"]
    rgb = processor(Image.fromarray(images[0]).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert gray.shape == (1, 1, 28, 28)
    assert torch.allclose(gray, rgb, atol=1 / 255)
    assert torch.allclose(gray[0, 0], torch.from_numpy(images[0] / 255.0).float(), atol=1e-6)


def test_image_processor_resizes_and_reloads(tmp_path):
    processor = NVCImageProcessor()
    large = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 40), dtype=np.uint8))
    assert processor(large, return_tensors="pt")["pixel_values"].shape == (1, 1, 28, 28)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, NVCImageProcessor)
    assert reloaded.num_channels == 1


def test_image_processor_rejects_channel_count():
    with pytest.raises(ValueError, match="num_channels must be 1"):
        NVCImageProcessor(num_channels=2)


def test_pipeline_classifies_real_digits(trained_image_folder, mnist_test_digits):
    images, labels = mnist_test_digits
    classifier = pipeline("image-classification", model=str(trained_image_folder), device="cpu")
    predictions = classifier([Image.fromarray(image) for image in images[:50]], top_k=1)
    predicted = [int(prediction[0]["label"]) for prediction in predictions]
    correct = sum(int(p == label) for p, label in zip(predicted, labels[:50]))
    assert correct >= 45, f"{correct}/50 correct"


def test_output_folder_and_card(trained_image_folder):
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "training_args.json",
        "results.json",
        "latent_space.png",
        "README.md",
    ):
        assert (trained_image_folder / name).exists(), name

    results = json.loads((trained_image_folder / "results.json").read_text())["test"]
    assert results["accuracy"] > 0.9
    assert results["anchors_in_use"] >= 10

    card = ModelCard.load(trained_image_folder / "README.md")
    assert card.data.library_name == "transformers"
    assert "nvc" in card.data.tags
    assert card.data.eval_results
    for result in card.data.eval_results:
        assert result.metric_value is not None and math.isfinite(result.metric_value)
        assert result.metric_type
        assert result.dataset_name == "MNIST"
    for setting in ("kl_prior", "nebula_distance", "mass_reduction", "nebula_radius", "metric_loss"):
        assert f"`{setting}`" in card.text, setting


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


class DigitDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.pixel_values = as_pixel_values(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def trainer_for(model, dataset, tmp_path, **overrides) -> Trainer:
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 16,
        "max_steps": 4,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset)


def test_trainer_trains_nvc_model(mnist_test_digits, tmp_path):
    images, labels = mnist_test_digits
    model = NVCForImageClassification(tiny_config())
    before = model.nvc.encoder.projection.weight.detach().clone()
    trainer = trainer_for(model, DigitDataset(images, labels), tmp_path, learning_rate=1e-3)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4
    assert all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(before, model.nvc.encoder.projection.weight)


def test_trainer_does_not_rescale_loss(mnist_test_digits, tmp_path):
    # A deterministic network (no sampling, no dropout) and a zero learning rate make every step's loss exactly
    # the model's loss on that batch, so a Trainer that rescaled it (by accumulation steps) would log a multiple.
    images, labels = mnist_test_digits
    torch.manual_seed(0)
    model = NVCForImageClassification(tiny_config(bottleneck_type="none"))
    dataset = DigitDataset(images[:64], labels[:64])
    trainer = trainer_for(
        model,
        dataset,
        tmp_path,
        learning_rate=0.0,
        gradient_accumulation_steps=2,
        max_steps=1,
        per_device_train_batch_size=32,
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]

    model.eval()
    with torch.no_grad():
        batch_losses = [
            model(pixel_values=dataset.pixel_values[index], labels=dataset.labels[index]).loss.item()
            for index in (slice(0, 32), slice(32, 64))
        ]
    # Shuffling changes which images form each micro-batch, so compare with the full-batch mean loosely.
    full = model(pixel_values=dataset.pixel_values, labels=dataset.labels).loss.item()
    assert logged == pytest.approx(full, rel=0.15)
    assert logged < 1.5 * max(batch_losses)
