"""The point-cloud head: config validation, order invariance, padding, Chamfer distance, input checks, Auto classes."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from nvc_hf import NVCForPointCloudClassification, NVCPointConfig, NVCPointModel
from nvc_hf.data.pointclouds import crop_clouds, load_modelnet, normalize_clouds
from nvc_hf.modeling_nvc_point import chamfer_distance


SUBSET = Path(__file__).resolve().parents[1] / "data" / "modelnet10" / "ModelNet10_pcd_subset.tar.gz"


@pytest.fixture(scope="module")
def clouds() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten real ModelNet10 test clouds (one per class), normalised, with their labels."""
    raw, labels, _, _ = load_modelnet(SUBSET, "test")
    first_of_class = [int((torch.as_tensor(labels) == label).nonzero()[0]) for label in range(10)]
    points = torch.as_tensor(normalize_clouds(raw[first_of_class]))
    return points, torch.as_tensor(labels[first_of_class])


def small_model(**overrides) -> NVCForPointCloudClassification:
    torch.manual_seed(0)
    settings = {"point_mlp_sizes": [32, 64], "hidden_size": 64, "latent_size": 8, "num_anchors": 4}
    settings.update(overrides)
    return NVCForPointCloudClassification(NVCPointConfig(**settings)).eval()


# Config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("point_mlp_sizes", [], "point_mlp_sizes must list at least one"),
        ("point_mlp_sizes", [64, 0], r"point_mlp_sizes\[1\] must be an integer >= 1"),
        ("hidden_size", 0, "hidden_size"),
        ("dropout", 1.0, "dropout must be in"),
        ("min_points", 0, "min_points"),
        ("reconstruction_weight", -1.0, "reconstruction_weight"),
        ("num_decoder_points", 0, "num_decoder_points"),
        ("num_anchors", 1, "num_anchors"),
        ("bottleneck_type", "vq", "bottleneck_type"),
    ],
)
def test_config_rejects_invalid_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        NVCPointConfig(**{field: value})


def test_config_defaults_and_round_trip(tmp_path):
    config = NVCPointConfig()
    assert config.model_type == "nvc-point"
    assert config.num_labels == 10
    assert config.kl_weight == config.nebula_weight == config.metric_weight == 0.01
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NVCPointConfig)
    assert loaded.point_mlp_sizes == [64, 128, 256]


# Order invariance and padding


@pytest.mark.parametrize("bottleneck_type", ["nvc", "none"])
def test_output_invariant_to_point_order(clouds, bottleneck_type):
    model = small_model(bottleneck_type=bottleneck_type)
    points, _ = clouds
    shuffled = points[:, torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        original, permuted = model(points=points), model(points=shuffled)
    torch.testing.assert_close(permuted.logits, original.logits)
    torch.testing.assert_close(permuted.mean, original.mean)
    torch.testing.assert_close(permuted.reconstruction, original.reconstruction)
    if bottleneck_type == "nvc":
        assert torch.equal(permuted.assignments, original.assignments)


def test_padding_mask_matches_unpadded_clouds(clouds):
    model = small_model()
    points, _ = clouds
    sizes = [1024, 700, 300]
    padded = torch.full((3, 1024, 3), float("nan"))
    point_mask = torch.zeros(3, 1024, dtype=torch.long)
    for index, size in enumerate(sizes):
        padded[index, :size] = points[index, :size]
        point_mask[index, :size] = 1
    with torch.no_grad():
        batched = model(points=padded, point_mask=point_mask)
        for index, size in enumerate(sizes):
            alone = model(points=points[index : index + 1, :size])
            torch.testing.assert_close(batched.logits[index], alone.logits[0])
            torch.testing.assert_close(batched.mean[index], alone.mean[0])
            torch.testing.assert_close(batched.reconstruction[index], alone.reconstruction[0])
    assert torch.isfinite(batched.logits).all()
    assert torch.isfinite(batched.reconstruction_loss)


def test_padding_changes_output_without_mask(clouds):
    model = small_model()
    points, _ = clouds
    padded = torch.cat([points[:1, :500], torch.full((1, 524, 3), 5.0)], dim=1)
    with torch.no_grad():
        alone = model(points=points[:1, :500]).logits
        unmasked = model(points=padded).logits
    assert not torch.allclose(alone, unmasked)


# Chamfer distance


def test_chamfer_distance_matches_brute_force(clouds):
    points, _ = clouds
    predicted = (points[:4, :200] + 0.05 * torch.randn(4, 200, 3)).requires_grad_(True)
    target = points[:4, 200:500]
    squared = (predicted.unsqueeze(2) - target.unsqueeze(1)).pow(2).sum(-1)
    expected = squared.min(2).values.mean(1) + squared.min(1).values.mean(1)
    value = chamfer_distance(predicted, target)
    torch.testing.assert_close(value, expected)
    (expected_grad,) = torch.autograd.grad(expected.sum(), predicted)
    (grad,) = torch.autograd.grad(chamfer_distance(predicted, target).sum(), predicted)
    torch.testing.assert_close(grad, expected_grad)


def test_chamfer_distance_ignores_padding(clouds):
    points, _ = clouds
    target = points[:2, :400].clone()
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 250:] = 0
    target[1, 250:] = 100.0
    predicted = points[:2, 400:600]
    masked = chamfer_distance(predicted, target, mask)
    torch.testing.assert_close(masked[1], chamfer_distance(predicted[1:], points[1:2, :250])[0])
    torch.testing.assert_close(masked[0], chamfer_distance(predicted[:1], target[:1])[0])
    assert chamfer_distance(points[:2], points[:2]).abs().max() == 0


def test_completion_target_reaches_loss(clouds):
    model = small_model()
    points, labels = clouds
    partial, point_mask = crop_clouds(points, (0.3, 0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        to_whole = model(points=partial, point_mask=point_mask, labels=labels, target_points=points)
        to_partial = model(points=partial, point_mask=point_mask, labels=labels)
    expected = chamfer_distance(to_whole.reconstruction, points).mean()
    torch.testing.assert_close(to_whole.reconstruction_loss, expected)
    assert not torch.allclose(to_whole.reconstruction_loss, to_partial.reconstruction_loss)
    assert to_whole.reconstruction.shape == (10, 1024, 3)


def test_no_decoder_without_reconstruction_weight(clouds):
    model = small_model(reconstruction_weight=0.0)
    assert model.decoder is None
    with torch.no_grad():
        outputs = model(points=clouds[0])
    assert outputs.reconstruction is None
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(torch.zeros(1, 8))


# Bad input


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1024, 3), r"points must have shape \(batch, points, 3\).*got \(1024, 3\)"),
        ((2, 1024, 2), r"points must have shape \(batch, points, 3\).*got \(2, 1024, 2\)"),
        ((2, 3, 1024), r"points must have shape \(batch, points, 3\).*got \(2, 3, 1024\)"),
        ((2, 1024, 3, 1), r"points must have shape \(batch, points, 3\)"),
        ((0, 1024, 3), "empty batch"),
        ((2, 0, 3), r"empty clouds \(0 points\)"),
    ],
)
def test_rejects_bad_shape(shape, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model(points=torch.zeros(shape))


def test_rejects_too_few_points(clouds):
    model = small_model(min_points=32)
    with pytest.raises(ValueError, match="has 20 points, fewer than min_points=32"):
        model(points=clouds[0][:, :20])
    mask = torch.ones(10, 1024, dtype=torch.long)
    mask[3, 10:] = 0
    with pytest.raises(ValueError, match="Cloud 3 of points has 10 points, fewer than min_points=32"):
        model(points=clouds[0], point_mask=mask)


def test_rejects_cloud_with_empty_mask(clouds):
    mask = torch.ones(10, 1024, dtype=torch.long)
    mask[4] = 0
    with pytest.raises(ValueError, match="Cloud 4 of points is empty"):
        small_model()(points=clouds[0], point_mask=mask)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_points(clouds, value):
    points = clouds[0].clone()
    points[2, 17, 0] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        small_model()(points=points)


def test_rejects_integer_points_and_bad_mask(clouds):
    model = small_model()
    with pytest.raises(TypeError, match="floating-point"):
        model(points=torch.zeros(2, 100, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(points=[[[0.0, 0.0, 0.0]]])
    with pytest.raises(ValueError, match=r"point_mask must have shape \(batch, points\)"):
        model(points=clouds[0], point_mask=torch.ones(10, 1000))
    with pytest.raises(ValueError, match="only 0"):
        model(points=clouds[0], point_mask=torch.full((10, 1024), 2))


def test_rejects_labels_out_of_range(clouds):
    points, labels = clouds
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        small_model()(points=points, labels=labels + 5)


# Auto classes and saving


def test_auto_classes_build_point_models():
    config = AutoConfig.for_model("nvc-point", point_mlp_sizes=[16], hidden_size=16, latent_size=4)
    assert isinstance(config, NVCPointConfig)
    assert isinstance(AutoModel.from_config(config), NVCPointModel)


def test_save_load_keeps_anchors_bit_exact(tmp_path, clouds):
    model = small_model()
    with torch.no_grad():
        model.bottleneck.anchors.copy_(torch.arange(32, dtype=torch.float32).view(4, 8))
    model.save_pretrained(tmp_path)
    loaded = NVCForPointCloudClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(loaded.bottleneck.anchors, model.bottleneck.anchors)
    with torch.no_grad():
        torch.testing.assert_close(loaded(points=clouds[0]).logits, model(points=clouds[0]).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(base, NVCPointModel)
    assert torch.equal(base.bottleneck.anchors, model.bottleneck.anchors)
