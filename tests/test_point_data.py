"""The PCD reader, ModelNet loading, normalisation, augmentation and cropping, on the committed ModelNet10 subset."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nvc_hf.data.pointclouds import (
    PCDError,
    augment_clouds,
    crop_clouds,
    load_modelnet,
    load_modelnet_splits,
    normalize_clouds,
    read_pcd,
)


SUBSET = Path(__file__).resolve().parents[1] / "data" / "modelnet10" / "ModelNet10_pcd_subset.tar.gz"
CLASSES = ["bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa", "table", "toilet"]


@pytest.fixture(scope="module")
def chair_pcd() -> bytes:
    """The bytes of one real chair PCD file from the subset."""
    with tarfile.open(SUBSET, "r:gz") as archive:
        member = next(m for m in archive.getmembers() if m.name.startswith("ModelNet10/pcd/chair/test/"))
        return archive.extractfile(member).read()


@pytest.fixture(scope="module")
def test_split():
    return load_modelnet(SUBSET, "test")


def split_header(data: bytes) -> tuple[str, bytes]:
    marker = b"DATA binary\n"
    end = data.index(marker) + len(marker)
    return data[:end].decode("ascii"), data[end:]


def test_read_pcd_real_file(chair_pcd):
    points = read_pcd(chair_pcd, "chair.pcd", expected_points=1024)
    assert points.shape == (1024, 3)
    assert points.dtype == np.float32
    assert np.isfinite(points).all()
    assert len(np.unique(points, axis=0)) == 1024


def test_read_pcd_ascii_matches_binary(chair_pcd):
    header, body = split_header(chair_pcd)
    points = np.frombuffer(body, dtype="<f4").reshape(-1, 3)
    ascii_body = "\n".join(" ".join(repr(float(value)) for value in row) for row in points)
    ascii_file = (header.replace("DATA binary", "DATA ascii") + ascii_body + "\n").encode()
    np.testing.assert_array_equal(read_pcd(ascii_file, "chair-ascii.pcd"), points)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("VERSION 0.7", "VERSION 0.6", "version 0.7"),
        ("FIELDS x y z", "FIELDS x y w", "FIELDS must contain 'z'"),
        ("SIZE 4 4 4", "SIZE 8 8 8", "float32"),
        ("TYPE F F F", "TYPE U U U", "float32"),
        ("COUNT 1 1 1", "COUNT 1 1", "COUNT lists 2 values"),
        ("WIDTH 1024", "WIDTH 1000", "WIDTH 1000 x HEIGHT 1 does not match POINTS 1024"),
        ("POINTS 1024", "POINTS 1o24", "POINTS must be one non-negative integer"),
        ("DATA binary", "DATA binary_compressed", "not supported"),
        ("HEIGHT 1\n", "", "expected the PCD header line HEIGHT"),
    ],
)
def test_read_pcd_rejects_corrupt_header(chair_pcd, old, new, message):
    header, body = split_header(chair_pcd)
    assert old in header
    corrupt = header.replace(old, new).encode() + body
    with pytest.raises(PCDError, match=message) as error:
        read_pcd(corrupt, "broken/chair_0001.pcd")
    assert "broken/chair_0001.pcd" in str(error.value)


def test_read_pcd_rejects_wrong_point_count(chair_pcd):
    header, body = split_header(chair_pcd)
    smaller = header.replace("WIDTH 1024", "WIDTH 1000").replace("POINTS 1024", "POINTS 1000")
    with pytest.raises(PCDError, match="small.pcd: expected 1024 points, the header says POINTS 1000"):
        read_pcd(smaller.encode() + body[: 1000 * 12], "small.pcd", expected_points=1024)


def test_read_pcd_rejects_truncated_data(chair_pcd):
    with pytest.raises(PCDError, match="cut.pcd: the binary data holds"):
        read_pcd(chair_pcd[:-12], "cut.pcd")


def test_read_pcd_rejects_truncated_header(chair_pcd):
    with pytest.raises(PCDError, match="cut.pcd: the PCD header ends before"):
        read_pcd(chair_pcd[:60], "cut.pcd")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_read_pcd_rejects_non_finite(chair_pcd, value):
    header, body = split_header(chair_pcd)
    points = np.frombuffer(body, dtype="<f4").reshape(-1, 3).copy()
    points[7, 1] = value
    with pytest.raises(PCDError, match="bad.pcd: 1 of 1024 points have NaN or infinite coordinates"):
        read_pcd(header.encode() + points.astype("<f4").tobytes(), "bad.pcd")


def test_load_modelnet_subset_is_stratified(test_split):
    clouds, labels, class_names, names = test_split
    assert clouds.shape == (200, 1024, 3)
    assert class_names == CLASSES
    assert np.bincount(labels).tolist() == [20] * 10
    for label, name in zip(labels, names):
        assert f"/{class_names[label]}/test/" in name

    train_clouds, train_labels, _, _ = load_modelnet(SUBSET, "train")
    assert train_clouds.shape == (400, 1024, 3)
    assert np.bincount(train_labels).tolist() == [40] * 10


def test_load_modelnet_folder_matches_archive(tmp_path, test_split):
    with tarfile.open(SUBSET, "r:gz") as archive:
        members = [m for m in archive.getmembers() if "/test/" in m.name][:30]
        for member in members:
            target = tmp_path / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    clouds, labels, class_names, _ = load_modelnet(tmp_path, "test")
    archive_clouds, archive_labels, archive_classes, _ = test_split
    np.testing.assert_array_equal(clouds, archive_clouds[:30])
    assert class_names == archive_classes[: len(class_names)]


def test_load_modelnet_error_names_file(tmp_path, chair_pcd):
    header, body = split_header(chair_pcd)
    broken = tmp_path / "ModelNet10" / "pcd" / "chair" / "test" / "chair_9999.pcd"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(header.replace("VERSION 0.7", "VERSION 0.5").encode() + body)
    with pytest.raises(PCDError, match="chair_9999.pcd"):
        load_modelnet(tmp_path, "test")


def test_load_modelnet_missing_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_modelnet("/nonexistent/ModelNet10.tar.gz", "train")


def test_normalize_clouds_unit_sphere(test_split):
    raw = test_split[0]
    clouds = normalize_clouds(raw)
    np.testing.assert_allclose(clouds.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(clouds, axis=-1).max(axis=1), 1, atol=1e-5)
    # The raw clouds are in mesh units, far from the unit sphere.
    assert np.linalg.norm(raw, axis=-1).max() > 10


def test_splits_keep_test_apart():
    splits = load_modelnet_splits(SUBSET, validation_fraction=0.25, seed=0)
    assert len(splits["train"][1]) == 300
    assert len(splits["validation"][1]) == 100
    assert len(splits["test"][1]) == 200
    assert splits["label_names"] == CLASSES
    with pytest.raises(ValueError, match="validation_fraction=0.0"):
        load_modelnet_splits(SUBSET, validation_fraction=0.0)


def test_augment_rotates_about_up_axis(test_split):
    points = torch.as_tensor(normalize_clouds(test_split[0][:8]))
    rotated = augment_clouds(points, max_rotation_degrees=180, scale_range=(1, 1), jitter_sigma=0)
    torch.testing.assert_close(rotated[..., 2], points[..., 2])
    torch.testing.assert_close(rotated[..., :2].norm(dim=-1), points[..., :2].norm(dim=-1))
    assert not torch.allclose(rotated, points)


def test_augment_scale_and_jitter_bounds(test_split):
    points = torch.as_tensor(normalize_clouds(test_split[0][:8]))
    scaled = augment_clouds(points, max_rotation_degrees=0, scale_range=(0.5, 0.5), jitter_sigma=0)
    torch.testing.assert_close(scaled, points * 0.5)
    jittered = augment_clouds(points, max_rotation_degrees=0, scale_range=(1, 1), jitter_sigma=1.0, jitter_clip=0.05)
    assert (jittered - points).abs().max() <= 0.05 + 1e-6
    assert (jittered - points).abs().max() > 0.04


def test_crop_removes_one_side(test_split):
    points = torch.as_tensor(normalize_clouds(test_split[0][:6]))
    generator = torch.Generator().manual_seed(0)
    partial, mask = crop_clouds(points, (0.1, 0.4), generator=generator)
    counts = mask.sum(1)
    assert partial.shape[1] == int(counts.max())
    assert counts.min() >= round(1024 * 0.6) - 1
    assert counts.max() <= round(1024 * 0.9) + 1
    assert len(set(counts.tolist())) > 1
    # Padding slots are zero, and every kept point is a point of the original cloud.
    assert (partial[mask == 0] == 0).all()
    for index in range(points.shape[0]):
        kept = partial[index, : counts[index]]
        matches = (kept.unsqueeze(1) == points[index].unsqueeze(0)).all(-1).any(1)
        assert matches.all()


def test_crop_ratio_validated():
    with pytest.raises(ValueError, match="crop_ratio"):
        crop_clouds(torch.zeros(1, 10, 3), (0.5, 1.0))
