"""Bad input for all three heads, one row per case: configs, tensors and files.

Every error row asserts the exact exception type and that the message names the offending value and the fix. Rows that expect correct handling (a cast, a finite loss) assert the result instead.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor
from transformers.testing_utils import CaptureLogger

from nvc_hf import (
    NVCBottleneck,
    NVCForConditionalGeneration,
    NVCForImageClassification,
    NVCForPointCloudClassification,
    NVCPointConfig,
    NVCTextConfig,
    NVCVisionConfig,
)
from nvc_hf.configuration_nvc import logger as config_logger
from nvc_hf.data.mnist import read_idx


# ---------------------------------------------------------------------------------------------------------------
# Config fields: every numeric field at 0, negative, NaN and of the wrong type; unknown choices.
# ---------------------------------------------------------------------------------------------------------------

# Kinds of numeric field and the values each must reject. A value valid for a kind (0 for a weight) is absent.
BAD_VALUES = {
    "positive_int": [0, -1, math.nan, "8", 2.5],
    "non_negative_int": [-1, math.nan, "8", 2.5],
    "positive_float": [0.0, -1.0, math.nan, math.inf, "1"],
    "non_negative_float": [-1.0, math.nan, math.inf, "1"],
    "unit_interval": [-0.1, 1.0, math.nan, "0.1"],
}
SHARED_FIELDS = {
    "latent_size": "positive_int",
    "num_anchors": "positive_int",
    "nebula_radius": "positive_float",
    "nebula_eps": "positive_float",
    "metric_margin": "non_negative_float",
    "kl_weight": "non_negative_float",
    "nebula_weight": "non_negative_float",
    "metric_weight": "non_negative_float",
    "anchor_warmup_steps": "non_negative_int",
    "metric_max_samples": "positive_int",
}
HEAD_FIELDS = {
    NVCVisionConfig: {
        "num_channels": "positive_int",
        "image_size": "positive_int",
        "hidden_size": "positive_int",
        "classifier_hidden_size": "positive_int",
        "dropout": "unit_interval",
        "reconstruction_weight": "non_negative_float",
        "num_labels": "positive_int",
    },
    NVCPointConfig: {
        "hidden_size": "positive_int",
        "classifier_hidden_size": "positive_int",
        "dropout": "unit_interval",
        "min_points": "positive_int",
        "reconstruction_weight": "non_negative_float",
        "num_decoder_points": "positive_int",
        "decoder_hidden_size": "positive_int",
        "num_labels": "positive_int",
    },
    NVCTextConfig: {
        "vocab_size": "positive_int",
        "d_model": "positive_int",
        "encoder_layers": "positive_int",
        "decoder_layers": "positive_int",
        "attention_heads": "positive_int",
        "ffn_dim": "positive_int",
        "max_position_embeddings": "positive_int",
        "dropout": "unit_interval",
        "attention_dropout": "unit_interval",
        "label_smoothing": "unit_interval",
        "pad_token_id": "non_negative_int",
        "bos_token_id": "non_negative_int",
        "eos_token_id": "non_negative_int",
        "decoder_start_token_id": "non_negative_int",
    },
}
CHOICE_FIELDS = {
    "bottleneck_type": ("nvc", "vae", "none"),
    "kl_prior": ("anchor", "standard"),
    "metric_loss": ("triplet", "ratio"),
    "nebula_distance": ("softplus", "clamp", "raw"),
    "mass_reduction": ("mean", "sum"),
}
TEXT_CHOICE_FIELDS = {"activation_function": ("relu", "gelu"), "bottleneck_level": ("token", "sentence")}


def numeric_config_rows() -> list:
    rows = []
    for config_class, head_fields in HEAD_FIELDS.items():
        for field, kind in {**SHARED_FIELDS, **head_fields}.items():
            for value in BAD_VALUES[kind]:
                rows.append(
                    pytest.param(config_class, field, value, id=f"{config_class.model_type}-{field}={value!r}")
                )
    return rows


@pytest.mark.parametrize("config_class, field, value", numeric_config_rows())
def test_config_rejects_bad_number(config_class, field, value):
    with pytest.raises(ValueError) as raised:
        config_class(**{field: value})
    message = str(raised.value)
    assert field in message
    assert repr(value) in message or str(value) in message
    assert any(word in message for word in ("must", "use one of", "choose")), message


def choice_config_rows() -> list:
    rows = []
    for config_class in HEAD_FIELDS:
        choices = {**CHOICE_FIELDS, **(TEXT_CHOICE_FIELDS if config_class is NVCTextConfig else {})}
        for field, allowed in choices.items():
            rows.append(pytest.param(config_class, field, allowed, id=f"{config_class.model_type}-{field}"))
    return rows


@pytest.mark.parametrize("config_class, field, allowed", choice_config_rows())
def test_config_rejects_unknown_choice(config_class, field, allowed):
    with pytest.raises(ValueError) as raised:
        config_class(**{field: "unknown-choice"})
    message = str(raised.value)
    assert "'unknown-choice'" in message
    for choice in allowed:
        assert repr(choice) in message


@pytest.mark.parametrize(
    "config_class, overrides, fragments",
    [
        pytest.param(NVCVisionConfig, {"conv_channels": 32}, ["conv_channels", "32", "[32, 64]"], id="conv-int"),
        pytest.param(NVCVisionConfig, {"conv_channels": "32,64"}, ["'32,64'", "[32, 64]"], id="conv-string"),
        pytest.param(NVCVisionConfig, {"conv_channels": [32]}, ["conv_channels", "[32]", "two"], id="conv-one"),
        pytest.param(NVCVisionConfig, {"conv_channels": [32, 0]}, ["conv_channels[1]", "got 0"], id="conv-zero"),
        pytest.param(NVCVisionConfig, {"image_size": 30}, ["image_size", "30", "divisible by 4"], id="size-not-4x"),
        pytest.param(NVCVisionConfig, {"num_labels": 1}, ["num_labels", "got 1", ">= 2"], id="one-label"),
        pytest.param(NVCPointConfig, {"point_mlp_sizes": 64}, ["point_mlp_sizes", "64", "list"], id="mlp-int"),
        pytest.param(NVCPointConfig, {"point_mlp_sizes": []}, ["point_mlp_sizes", "at least one"], id="mlp-empty"),
        pytest.param(
            NVCTextConfig, {"scale_embedding": "no"}, ["scale_embedding", "'no'", "True or False"], id="flag"
        ),
        pytest.param(NVCTextConfig, {"tie_word_embeddings": 1}, ["tie_word_embeddings", "1"], id="tie-int"),
        pytest.param(NVCTextConfig, {"attention_heads": 3}, ["attention_heads=3", "divides d_model"], id="heads"),
        pytest.param(NVCTextConfig, {"pad_token_id": 9000}, ["pad_token_id=9000", "vocab_size=8000"], id="pad-id"),
        pytest.param(NVCVisionConfig, {"num_anchors": 1}, ["num_anchors", "got 1", ">= 2"], id="one-anchor"),
        pytest.param(NVCVisionConfig, {"nebula_radius": "big"}, ["nebula_radius", "'big'", "'auto'"], id="radius"),
    ],
)
def test_config_rejects_bad_structure(config_class, overrides, fragments):
    with pytest.raises(ValueError) as raised:
        config_class(**overrides)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_many_anchors_allowed_with_warning():
    # Any number of anchors fits in any latent space, so a large count is valid; crowding is only warned about.
    with CaptureLogger(config_logger) as captured:
        config = NVCVisionConfig(num_anchors=500, latent_size=2)
    assert config.num_anchors == 500
    assert "num_anchors=500" in captured.out
    assert "latent_size" in captured.out


# ---------------------------------------------------------------------------------------------------------------
# Tensors: rank, channels, coordinates, dtype, NaN/inf, empty batch, padding and position limits.
# ---------------------------------------------------------------------------------------------------------------


def build_models() -> dict:
    torch.manual_seed(0)
    vision = NVCForImageClassification(
        NVCVisionConfig(conv_channels=[4, 8], hidden_size=16, latent_size=8, num_anchors=4)
    )
    point = NVCForPointCloudClassification(
        NVCPointConfig(point_mlp_sizes=[8, 16], hidden_size=16, latent_size=8, num_anchors=4, num_decoder_points=32)
    )
    text = NVCForConditionalGeneration(
        NVCTextConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            attention_heads=2,
            ffn_dim=32,
            latent_size=8,
            num_anchors=4,
            max_position_embeddings=16,
        )
    )
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=3)
    return {"vision": vision.eval(), "point": point.eval(), "text": text.eval(), "bottleneck": bottleneck.eval()}


MODELS = build_models()
IMAGES = torch.rand(2, 1, 28, 28)
CLOUDS = torch.rand(2, 32, 3)
TOKENS = torch.randint(3, 50, (2, 5))


def with_value(tensor: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    copy = tensor.clone()
    copy[index] = value
    return copy


def vision(**inputs):
    return MODELS["vision"](**{"pixel_values": IMAGES, **inputs})


def point(**inputs):
    return MODELS["point"](**{"points": CLOUDS, **inputs})


def text(**inputs):
    return MODELS["text"](**{"input_ids": TOKENS, "labels": TOKENS, **inputs})


TENSOR_ERRORS = [
    # Image head.
    ("image-rank-3", lambda: vision(pixel_values=IMAGES[0]), ValueError, ["(1, 28, 28)", "(batch, 1, 28, 28)"]),
    ("image-3-channels", lambda: vision(pixel_values=IMAGES.expand(2, 3, 28, 28)), ValueError, ["(2, 3, 28, 28)"]),
    ("image-size-32", lambda: vision(pixel_values=torch.rand(2, 1, 32, 32)), ValueError, ["(2, 1, 32, 32)", "resize"]),
    ("image-empty-batch", lambda: vision(pixel_values=IMAGES[:0]), ValueError, ["empty batch", "at least one"]),
    ("image-uint8", lambda: vision(pixel_values=(IMAGES * 255).byte()), TypeError, ["torch.uint8", "processor"]),
    ("image-nan", lambda: vision(pixel_values=with_value(IMAGES, (0, 0, 3, 3), math.nan)), ValueError, ["NaN"]),
    ("image-inf", lambda: vision(pixel_values=with_value(IMAGES, (1, 0, 0, 0), math.inf)), ValueError, ["infinite"]),
    ("image-list", lambda: vision(pixel_values=IMAGES.tolist()), TypeError, ["torch.Tensor", "list"]),
    ("image-float-labels", lambda: vision(labels=torch.tensor([1.0, 2.0])), TypeError, ["torch.float32", "long()"]),
    ("image-label-10", lambda: vision(labels=torch.tensor([1, 10])), ValueError, ["[0, 10)", "to 10", "num_labels"]),
    ("image-label-shape", lambda: vision(labels=torch.tensor([1])), ValueError, ["(2,)", "(1,)"]),
    # Point-cloud head.
    ("points-rank-2", lambda: point(points=CLOUDS[0]), ValueError, ["(32, 3)", "unsqueeze(0)"]),
    ("points-2-coordinates", lambda: point(points=CLOUDS[..., :2]), ValueError, ["(2, 32, 2)", "x, y, z"]),
    ("points-4-coordinates", lambda: point(points=torch.rand(2, 32, 4)), ValueError, ["(2, 32, 4)", "x, y, z"]),
    ("points-empty-batch", lambda: point(points=CLOUDS[:0]), ValueError, ["empty batch", "at least one"]),
    ("points-no-points", lambda: point(points=CLOUDS[:, :0]), ValueError, ["(0 points)", "at least 16 points"]),
    ("points-int", lambda: point(points=(CLOUDS * 10).long()), TypeError, ["torch.int64", "floating-point"]),
    ("points-nan", lambda: point(points=with_value(CLOUDS, (0, 5, 1), math.nan)), ValueError, ["NaN"]),
    ("points-inf", lambda: point(points=with_value(CLOUDS, (1, 0, 0), -math.inf)), ValueError, ["infinite"]),
    ("points-mask-shape", lambda: point(point_mask=torch.ones(2, 31)), ValueError, ["(2, 32)", "(2, 31)"]),
    ("points-mask-2", lambda: point(point_mask=torch.full((2, 32), 2)), ValueError, ["only 0", "1"]),
    ("points-all-padding", lambda: point(point_mask=torch.zeros(2, 32)), ValueError, ["Cloud 0", "no real point"]),
    ("points-too-few", lambda: point(points=CLOUDS[:, :8]), ValueError, ["8 points", "min_points=16"]),
    ("points-float-labels", lambda: point(labels=torch.tensor([0.0, 1.0])), TypeError, ["torch.float32", "long()"]),
    # Translation head.
    ("text-1d-ids", lambda: text(input_ids=TOKENS[0]), ValueError, ["(5,)", "(batch, length)", "tokenizer"]),
    ("text-float-ids", lambda: text(input_ids=TOKENS.float()), TypeError, ["torch.float32", "integer"]),
    ("text-empty-batch", lambda: text(input_ids=TOKENS[:0], labels=TOKENS[:0]), ValueError, ["(0, 5)", "at least"]),
    ("text-empty-length", lambda: text(input_ids=TOKENS[:, :0]), ValueError, ["empty along the length"]),
    ("text-id-50", lambda: text(input_ids=with_value(TOKENS, (0, 0), 50)), ValueError, ["to 50", "[0, 50)"]),
    ("text-negative-id", lambda: text(input_ids=with_value(TOKENS, (0, 0), -5)), ValueError, ["from -5", "tokenizer"]),
    ("text-source-17", lambda: text(input_ids=torch.randint(3, 50, (2, 17))), ValueError, ["17 tokens", "truncat"]),
    ("text-target-17", lambda: text(labels=torch.randint(3, 50, (2, 17))), ValueError, ["17 tokens", "max_length"]),
    ("text-mask-shape", lambda: text(attention_mask=torch.ones(2, 4)), ValueError, ["(2, 4)", "(2, 5)"]),
    ("text-mask-2", lambda: text(attention_mask=torch.full((2, 5), 2)), ValueError, ["only 1", "tokenizer"]),
    ("text-all-padding-labels", lambda: text(labels=torch.full((2, 5), -100)), ValueError, ["only -100", "drop"]),
    ("text-label-id-50", lambda: text(labels=with_value(TOKENS, (1, 1), 50)), ValueError, ["labels", "to 50"]),
    (
        "text-generate-past-limit",
        lambda: MODELS["text"].generate(TOKENS, max_new_tokens=30, min_new_tokens=30),
        ValueError,
        ["max_position_embeddings=16", "max_new_tokens"],
    ),
    # The bottleneck used on its own.
    ("bottleneck-rank-1", lambda: MODELS["bottleneck"](torch.rand(4)), ValueError, ["(4,)", "(batch, input_size)"]),
    ("bottleneck-rank-4", lambda: MODELS["bottleneck"](torch.rand(1, 2, 3, 4)), ValueError, ["(1, 2, 3, 4)"]),
    ("bottleneck-width", lambda: MODELS["bottleneck"](torch.rand(3, 5)), ValueError, ["input_size=4", "width 5"]),
    ("bottleneck-int", lambda: MODELS["bottleneck"](torch.ones(3, 4, dtype=torch.long)), TypeError, ["torch.int64"]),
    (
        "bottleneck-nan",
        lambda: MODELS["bottleneck"](torch.full((3, 4), math.nan)),
        FloatingPointError,
        ["NaN", "learning rate"],
    ),
    (
        "bottleneck-mask-shape",
        lambda: MODELS["bottleneck"](torch.rand(2, 3, 4), attention_mask=torch.ones(2, 4)),
        ValueError,
        ["(2, 4)", "(2, 3)"],
    ),
]


@pytest.mark.parametrize(
    "build, error, fragments", [row[1:] for row in TENSOR_ERRORS], ids=[row[0] for row in TENSOR_ERRORS]
)
def test_tensor_input_rejected(build, error, fragments):
    with pytest.raises(error) as raised:
        build()
    assert type(raised.value) is error
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize(
    "name, inputs",
    [
        ("vision", {"pixel_values": IMAGES}),
        ("point", {"points": CLOUDS}),
        ("bottleneck", {"hidden_states": torch.rand(3, 4)}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_precision_is_cast(name, inputs, dtype):
    model = MODELS[name]
    (key, value), *_ = inputs.items()
    expected = model(**{key: value.to(dtype).float()})
    actual = model(**{key: value.to(dtype)})
    assert actual.mean.dtype == torch.float32
    assert torch.equal(actual.mean, expected.mean)


@pytest.mark.parametrize("name", ["vision", "point", "text"])
def test_batch_of_one_trains(name):
    model = MODELS[name].train()
    inputs = {
        "vision": {"pixel_values": IMAGES[:1], "labels": torch.tensor([3])},
        "point": {"points": CLOUDS[:1], "labels": torch.tensor([3])},
        "text": {"input_ids": TOKENS[:1], "labels": TOKENS[:1]},
    }[name]
    model.bottleneck.anchors_initialized.fill_(True)
    try:
        output = model(**inputs)
        output.loss.backward()
    finally:
        model.bottleneck.anchors_initialized.fill_(False)
        model.zero_grad()
        model.eval()
    assert torch.isfinite(output.loss)
    for parameter_name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), parameter_name


def test_all_padding_source_gives_finite_loss():
    model = MODELS["text"].train()
    model.bottleneck.anchors_initialized.fill_(True)
    try:
        output = model(
            input_ids=TOKENS, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]), labels=TOKENS
        )
        output.loss.backward()
        gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    finally:
        model.bottleneck.anchors_initialized.fill_(False)
        model.zero_grad()
        model.eval()
    assert torch.isfinite(output.loss)
    assert gradients
    for gradient in gradients:
        assert torch.isfinite(gradient).all()


# ---------------------------------------------------------------------------------------------------------------
# Files: broken weights, another model's config, mismatched shapes, missing tokenizer or processor, broken data.
# ---------------------------------------------------------------------------------------------------------------

MODEL_CLASSES = {
    "vision": NVCForImageClassification,
    "point": NVCForPointCloudClassification,
    "text": NVCForConditionalGeneration,
}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name in MODEL_CLASSES:
        folders[name] = root / name
        MODELS[name].save_pretrained(folders[name])
    return folders


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_rejected(saved_folders, tmp_path, name, damage):
    folder = copy_folder(saved_folders[name], tmp_path / name)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(OSError) as raised:
        MODEL_CLASSES[name].from_pretrained(folder, dtype=torch.float32)
    assert str(folder) in str(raised.value)
    assert "truncated or corrupt" in str(raised.value)
    assert "again" in str(raised.value)


@pytest.mark.parametrize(
    "loaded, saved", [(a, b) for a in MODEL_CLASSES for b in MODEL_CLASSES if a != b], ids=lambda value: value
)
def test_config_of_other_model_type_rejected(saved_folders, loaded, saved):
    with pytest.raises(ValueError) as raised:
        MODEL_CLASSES[loaded].from_pretrained(saved_folders[saved], dtype=torch.float32)
    message = str(raised.value)
    assert f"model_type='nvc-{saved}'" in message
    assert MODEL_CLASSES[loaded].config_class.__name__ in message
    assert "AutoModel" in message


@pytest.mark.parametrize(
    "name, field, value, keys",
    [
        (
            "vision",
            "latent_size",
            6,
            ["nvc.bottleneck.anchors: checkpoint (4, 8), config (4, 6)", "classifier.0.weight"],
        ),
        ("point", "hidden_size", 12, ["nvc.encoder.projection.weight", "nvc.bottleneck.mean_projection.weight"]),
        (
            "text",
            "ffn_dim",
            24,
            ["model.encoder.layers.0.feed_forward.fc1.weight: checkpoint (32, 16), config (24, 16)"],
        ),
    ],
)
def test_shape_mismatch_lists_keys(saved_folders, tmp_path, name, field, value, keys):
    folder = copy_folder(saved_folders[name], tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError) as raised:
        MODEL_CLASSES[name].from_pretrained(folder, dtype=torch.float32)
    for key in keys:
        assert key in str(raised.value)
    assert "ignore_mismatched_sizes=True" in str(raised.value)


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_missing_weights_file_named(saved_folders, tmp_path, name):
    folder = copy_folder(saved_folders[name], tmp_path / name)
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError) as raised:
        MODEL_CLASSES[name].from_pretrained(folder, dtype=torch.float32)
    assert "model.safetensors" in str(raised.value)
    assert str(folder) in str(raised.value)


def test_missing_tokenizer_fails_before_loading(saved_folders):
    import evaluate_translation

    with pytest.raises(FileNotFoundError) as raised:
        evaluate_translation.main(["--model", str(saved_folders["text"]), "--max_samples", "2"])
    assert str(saved_folders["text"]) in str(raised.value)
    assert "tokenizer.json" in str(raised.value)
    assert "save_pretrained" in str(raised.value)


def test_missing_image_processor_named(saved_folders):
    with pytest.raises(OSError) as raised:
        AutoImageProcessor.from_pretrained(saved_folders["vision"])
    assert str(saved_folders["vision"]) in str(raised.value)
    assert "preprocessor_config.json" in str(raised.value)


def idx_bytes(shape: tuple[int, ...], type_code: int = 0x08, payload: int | None = None) -> bytes:
    header = bytes([0, 0, type_code, len(shape)]) + b"".join(size.to_bytes(4, "big") for size in shape)
    count = math.prod(shape) if payload is None else payload
    return header + bytes(count)


@pytest.mark.parametrize(
    "content, fragments",
    [
        pytest.param(b"\x01\x00\x08\x01" + bytes(8), ["not an IDX file", "two zero bytes"], id="magic"),
        pytest.param(idx_bytes((2, 2), type_code=0x0D), ["type code 0x0d", "unsigned bytes"], id="float-type"),
        pytest.param(bytes([0, 0, 8, 3, 0, 0]), ["truncated IDX header", "3 dimensions"], id="short-header"),
        pytest.param(bytes([0, 0, 8, 0]), ["truncated IDX header", "0 dimensions"], id="no-dimensions"),
        pytest.param(
            idx_bytes((10, 28, 28), payload=28 * 28 * 9), ["(10, 28, 28)", "truncated or corrupt"], id="short"
        ),
        pytest.param(idx_bytes((2, 2), payload=5), ["(2, 2)", "truncated or corrupt"], id="long"),
    ],
)
def test_bad_idx_file_rejected(tmp_path, content, fragments):
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(ValueError) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_truncated_gzip_idx_rejected(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes((100,)))[:-12])
    with pytest.raises(ValueError) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)
    assert "Cannot read IDX file" in str(raised.value)
