"""Point clouds for the training scripts: a PCD reader, ModelNet loading, normalisation, augmentation and cropping.

The reader handles the uncompressed PCD v0.7 files of the ModelNet10 archive (`DATA binary` or `DATA ascii`, float32
`x y z` fields). It reads them straight from a `.tar.gz` archive or from a folder, and raises a `PCDError` naming
the file for any header it cannot trust, a wrong point count, or NaN and infinite coordinates.
"""

from __future__ import annotations

import math
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch


# Header keywords of PCD v0.7, in the order the format requires.
PCD_HEADER_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
SPLITS = ("train", "test")


class PCDError(ValueError):
    """A PCD file that cannot be read: bad header, wrong point count, truncated data or non-finite coordinates."""


def _parse_header(data: bytes, name: str) -> tuple[dict[str, list[str]], int]:
    """Return the header fields and the byte offset where the point data starts."""
    header: dict[str, list[str]] = {}
    offset = 0
    while len(header) < len(PCD_HEADER_KEYS):
        end = data.find(b"\n", offset)
        if end < 0:
            missing = [key for key in PCD_HEADER_KEYS if key not in header]
            raise PCDError(
                f"{name}: the PCD header ends before {', '.join(missing)}; the file is truncated or not PCD."
            )
        try:
            line = data[offset:end].decode("ascii").strip()
        except UnicodeDecodeError:
            raise PCDError(f"{name}: the PCD header contains non-ASCII bytes at offset {offset}.") from None
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        expected = PCD_HEADER_KEYS[len(header)]
        if key != expected:
            raise PCDError(f"{name}: expected the PCD header line {expected}, found {line!r}.")
        header[key] = values
    return header, offset


def _header_int(header: dict[str, list[str]], key: str, name: str) -> int:
    values = header[key]
    if len(values) != 1 or not values[0].isdigit():
        raise PCDError(f"{name}: {key} must be one non-negative integer, got {' '.join(values)!r}.")
    return int(values[0])


def read_pcd(data: bytes, name: str = "<bytes>", expected_points: int | None = None) -> np.ndarray:
    """Parse the bytes of a PCD file into a `float32` array of shape `(points, 3)` with the `x y z` columns.

    Checks the version (0.7), that every field is a 4-byte float (`SIZE 4`, `TYPE F`, `COUNT 1`), that `x`, `y` and
    `z` are present, that `WIDTH * HEIGHT == POINTS`, the data size, the point count (`expected_points`, if given)
    and that every coordinate is finite. `name` is used in the error messages.
    """
    header, offset = _parse_header(data, name)

    if header["VERSION"] not in (["0.7"], [".7"]):
        raise PCDError(f"{name}: only PCD version 0.7 is supported, got VERSION {' '.join(header['VERSION'])}.")
    fields = header["FIELDS"]
    for axis in ("x", "y", "z"):
        if fields.count(axis) != 1:
            raise PCDError(f"{name}: FIELDS must contain {axis!r} exactly once, got {' '.join(fields)!r}.")
    for key, expected in (("SIZE", "4"), ("TYPE", "F"), ("COUNT", "1")):
        if len(header[key]) != len(fields):
            raise PCDError(f"{name}: {key} lists {len(header[key])} values for {len(fields)} FIELDS.")
        if any(value != expected for value in header[key]):
            raise PCDError(
                f"{name}: only float32 fields are supported ({key} {expected} for every field), "
                f"got {key} {' '.join(header[key])}."
            )

    width = _header_int(header, "WIDTH", name)
    height = _header_int(header, "HEIGHT", name)
    num_points = _header_int(header, "POINTS", name)
    if width * height != num_points:
        raise PCDError(f"{name}: WIDTH {width} x HEIGHT {height} does not match POINTS {num_points}.")
    if expected_points is not None and num_points != expected_points:
        raise PCDError(f"{name}: expected {expected_points} points, the header says POINTS {num_points}.")
    if num_points == 0:
        raise PCDError(f"{name}: the point cloud is empty (POINTS 0).")

    encoding = header["DATA"]
    if encoding == ["binary"]:
        row_bytes = 4 * len(fields)
        body = data[offset:]
        if len(body) != num_points * row_bytes:
            raise PCDError(
                f"{name}: the binary data holds {len(body)} bytes, but POINTS {num_points} x {row_bytes} bytes per "
                f"point needs {num_points * row_bytes}."
            )
        table = np.frombuffer(body, dtype="<f4").reshape(num_points, len(fields))
    elif encoding == ["ascii"]:
        try:
            table = np.loadtxt(data[offset:].decode("ascii").splitlines(), dtype=np.float32, ndmin=2)
        except (UnicodeDecodeError, ValueError) as error:
            raise PCDError(f"{name}: the ascii point data could not be parsed: {error}") from None
        if table.shape != (num_points, len(fields)):
            raise PCDError(
                f"{name}: the ascii data has shape {table.shape}, the header says {num_points} points of "
                f"{len(fields)} fields."
            )
    else:
        raise PCDError(f"{name}: DATA {' '.join(encoding)} is not supported; use binary or ascii PCD.")

    points = table[:, [fields.index("x"), fields.index("y"), fields.index("z")]].astype(np.float32)
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points)).any(axis=1).sum())
        raise PCDError(f"{name}: {bad} of {num_points} points have NaN or infinite coordinates.")
    return points


def _modelnet_entry(path: str) -> tuple[str, str] | None:
    """Return `(class, split)` for a ModelNet path `.../<class>/<split>/<name>.pcd`, else `None`."""
    parts = PurePosixPath(path).parts
    if len(parts) < 3 or not parts[-1].endswith(".pcd") or parts[-2] not in SPLITS:
        return None
    return parts[-3], parts[-2]


def load_modelnet(
    path: str | Path, split: str, expected_points: int | None = 1024
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Read one split of a ModelNet point-cloud set laid out as `<class>/<split>/<name>.pcd`.

    `path` is a `.tar.gz` (or `.tar`) archive, read without unpacking, or a folder. Returns the raw clouds
    `(n, points, 3)` as `float32`, the labels `(n,)`, the sorted class names and the file names; the class names
    come from every split, so the labels of the train and test splits agree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass a ModelNet .tar.gz archive or a folder of .pcd files.")

    clouds, class_of_cloud, names, classes = [], [], [], set()
    if path.is_dir():
        for file in sorted(path.rglob("*.pcd")):
            entry = _modelnet_entry(file.relative_to(path).as_posix())
            if entry is None:
                continue
            classes.add(entry[0])
            if entry[1] == split:
                clouds.append(read_pcd(file.read_bytes(), str(file), expected_points))
                class_of_cloud.append(entry[0])
                names.append(str(file))
    else:
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError as error:
            raise ValueError(f"{path} is neither a folder nor a readable tar archive: {error}") from None
        with archive:
            for member in sorted(archive.getmembers(), key=lambda member: member.name):
                entry = _modelnet_entry(member.name) if member.isfile() else None
                if entry is None:
                    continue
                classes.add(entry[0])
                if entry[1] == split:
                    name = f"{path}:{member.name}"
                    clouds.append(read_pcd(archive.extractfile(member).read(), name, expected_points))
                    class_of_cloud.append(entry[0])
                    names.append(name)

    if not clouds:
        raise ValueError(f"No {split} clouds found in {path}; expected files named <class>/{split}/<name>.pcd.")
    if expected_points is None and len({cloud.shape[0] for cloud in clouds}) > 1:
        raise ValueError(f"The {split} clouds in {path} differ in size; pass expected_points or resample them.")
    class_names = sorted(classes)
    labels = np.asarray([class_names.index(name) for name in class_of_cloud], dtype=np.int64)
    return np.stack(clouds), labels, class_names, names


def normalize_clouds(clouds: np.ndarray) -> np.ndarray:
    """Centre each cloud of `(n, points, 3)` on its centroid and scale it so its farthest point lies at radius 1."""
    clouds = np.asarray(clouds, dtype=np.float64)
    centred = clouds - clouds.mean(axis=1, keepdims=True)
    radius = np.linalg.norm(centred, axis=-1).max(axis=1)
    if (radius <= 0).any():
        index = int(np.flatnonzero(radius <= 0)[0])
        raise ValueError(f"Cloud {index} has all its points at one location and cannot be scaled to the unit sphere.")
    return (centred / radius[:, None, None]).astype(np.float32)


def load_modelnet_splits(
    path: str | Path,
    validation_fraction: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    expected_points: int | None = 1024,
) -> dict:
    """Load normalised training, validation and test clouds `(n, points, 3)` with their labels.

    The validation split is a seeded random `validation_fraction` of the training split; the test split is kept for the final
    evaluation. `max_eval_samples` keeps that many validation clouds and a seeded random sample of as many test clouds.
    Returns `{"train": (clouds, labels), "validation": ..., "test": ..., "label_names": [...], "test_size": <clouds in
    the whole test split>}`.
    """
    train_clouds, train_labels, label_names, _ = load_modelnet(path, "train", expected_points)
    test_clouds, test_labels, test_names, _ = load_modelnet(path, "test", expected_points)
    if test_names != label_names:
        raise ValueError(f"The train and test splits of {path} list different classes: {label_names} vs {test_names}.")
    validation_size = round(validation_fraction * len(train_labels))
    if not 0 < validation_size < len(train_labels):
        raise ValueError(
            f"validation_fraction={validation_fraction} holds out {validation_size} of {len(train_labels)} training "
            "clouds; choose a fraction that leaves at least one cloud in each of the two splits."
        )

    order = np.random.default_rng(seed).permutation(len(train_labels))
    validation_index, train_index = order[:validation_size], order[validation_size:]
    if max_train_samples is not None:
        train_index = train_index[:max_train_samples]
    test_size = len(test_labels)
    if max_eval_samples is not None:
        # The files are sorted by class, so the test subset is a seeded random sample rather than the first clouds.
        validation_index = validation_index[:max_eval_samples]
        test_index = np.sort(np.random.default_rng(seed).permutation(len(test_labels))[:max_eval_samples])
        test_clouds, test_labels = test_clouds[test_index], test_labels[test_index]
    return {
        "train": (normalize_clouds(train_clouds[train_index]), train_labels[train_index]),
        "validation": (normalize_clouds(train_clouds[validation_index]), train_labels[validation_index]),
        "test": (normalize_clouds(test_clouds), test_labels),
        "label_names": label_names,
        "test_size": test_size,
    }


def augment_clouds(
    points: torch.Tensor,
    max_rotation_degrees: float = 15.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    jitter_sigma: float = 0.01,
    jitter_clip: float = 0.05,
    up_axis: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate each cloud of `(batch, points, 3)` about the up axis, scale it and jitter every point.

    The angle is uniform in `[-max_rotation_degrees, max_rotation_degrees]`, the scale uniform in `scale_range`, and
    the jitter Gaussian with standard deviation `jitter_sigma`, clipped to `[-jitter_clip, jitter_clip]`.
    """
    batch = points.shape[0]
    options = {"device": points.device, "generator": generator}
    angles = (torch.rand(batch, **options) * 2 - 1) * math.radians(max_rotation_degrees)
    cosine, sine = torch.cos(angles), torch.sin(angles)
    first, second = [axis for axis in range(3) if axis != up_axis]
    rotation = torch.zeros(batch, 3, 3, device=points.device)
    rotation[:, up_axis, up_axis] = 1
    rotation[:, first, first] = cosine
    rotation[:, first, second] = -sine
    rotation[:, second, first] = sine
    rotation[:, second, second] = cosine

    low, high = scale_range
    scales = low + torch.rand(batch, 1, 1, **options) * (high - low)
    noise = (torch.randn(points.shape, **options) * jitter_sigma).clamp(-jitter_clip, jitter_clip)
    return (points.float() @ rotation.transpose(1, 2)) * scales + noise


def crop_clouds(
    points: torch.Tensor,
    crop_ratio: tuple[float, float] = (0.25, 0.25),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut away the points on one side of each cloud of `(batch, points, 3)`, as a partial scan would miss them.

    For each cloud a random direction is drawn and the fraction `crop_ratio` (uniform in the given range) of points
    farthest along it is removed. Returns the partial clouds, padded to the largest kept count, and their
    `point_mask` `(batch, kept)` with 1 for real points and 0 for padding.
    """
    low, high = crop_ratio
    if not 0 <= low <= high < 1:
        raise ValueError(f"crop_ratio must satisfy 0 <= low <= high < 1, got {crop_ratio}.")
    batch, num_points, _ = points.shape
    options = {"device": points.device, "generator": generator}
    directions = torch.nn.functional.normalize(torch.randn(batch, 3, **options), dim=-1)
    ratios = low + torch.rand(batch, **options) * (high - low)
    kept_counts = (num_points - (ratios * num_points).round().long()).clamp(min=1)

    # Sorting by the projection puts the points nearest the kept side first; padding slots are then masked out.
    projections = (points.float() @ directions.unsqueeze(-1)).squeeze(-1)
    order = projections.argsort(dim=1)
    max_kept = int(kept_counts.max())
    order = order[:, :max_kept]
    partial = torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    point_mask = torch.arange(max_kept, device=points.device).unsqueeze(0) < kept_counts.unsqueeze(1)
    partial = partial.masked_fill(~point_mask.unsqueeze(-1), 0.0)
    return partial, point_mask.long()


__all__ = [
    "PCDError",
    "augment_clouds",
    "crop_clouds",
    "load_modelnet",
    "load_modelnet_splits",
    "normalize_clouds",
    "read_pcd",
]
