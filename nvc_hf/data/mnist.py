"""Reader for MNIST-style IDX files (optionally gzip-compressed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


# IDX type codes for the element types MNIST-style files use.
IDX_UNSIGNED_BYTE = 0x08
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (`.gz` or uncompressed) into an array.

    The header (two zero bytes, the type code, the number of dimensions, then one big-endian uint32 per
    dimension) is checked against the file size; a bad header or a truncated file raises `ValueError` naming the
    file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"Cannot read IDX file {path}: {error}.") from error

    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes.")
    if content[2] != IDX_UNSIGNED_BYTE:
        raise ValueError(f"{path} has IDX type code {content[2]:#04x}; only unsigned bytes (0x08) are supported.")
    num_dimensions = content[3]
    header_size = 4 + 4 * num_dimensions
    if num_dimensions == 0 or len(content) < header_size:
        raise ValueError(f"{path} has a truncated IDX header ({num_dimensions} dimensions, {len(content)} bytes).")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dimensions))
    expected = header_size + int(np.prod(shape))
    if len(content) != expected:
        raise ValueError(
            f"{path} has {len(content)} bytes but its header declares shape {shape} ({expected} bytes); "
            "the file is truncated or corrupt."
        )
    # A copy, so callers get a writable array rather than a view of the read-only bytes.
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MNIST file {stem}(.gz) not found in {folder}.")


def load_mnist(folder: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load the `"train"` or `"test"` split of MNIST from IDX files in `folder`.

    Returns `(images, labels)`: `uint8` arrays of shape `(n, 28, 28)` and `(n,)`.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = Path(folder)
    image_stem, label_stem = MNIST_FILES[split]
    images = read_idx(_find(folder, image_stem))
    labels = read_idx(_find(folder, label_stem))
    if images.ndim != 3:
        raise ValueError(f"MNIST images in {folder} must have 3 dimensions (n, rows, cols), got shape {images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{folder}: {images.shape[0]} images but labels of shape {labels.shape}; the files do not belong together."
        )
    return images, labels
