"""Image datasets for the training scripts: MNIST IDX folders or any `datasets` dataset with image and label columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .mnist import MNIST_FILES, load_mnist


def _is_mnist_folder(path: Path) -> bool:
    stem = MNIST_FILES["train"][0]
    return path.is_dir() and ((path / f"{stem}.gz").exists() or (path / stem).exists())


def _load_datasets_splits(name: str, image_column: str, label_column: str) -> tuple[dict, list[str]]:
    """Load a `datasets` dataset (a `save_to_disk` folder or a name/path for `load_dataset`) as float arrays."""
    import datasets

    from ..image_processing_nvc import NVCImageProcessor

    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(name)
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded or "test" not in loaded:
        raise ValueError(f"Dataset {name} must have 'train' and 'test' splits; found {list(loaded.keys())}.")

    train = loaded["train"]
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise ValueError(
                f"Column {column!r} not found in dataset {name} (columns: {train.column_names}); "
                "set --image_column and --label_column."
            )
    label_feature = train.features[label_column]
    label_names = list(getattr(label_feature, "names", None) or sorted(set(train[label_column])))

    processor = NVCImageProcessor(num_channels=1)
    arrays = {}
    for split in ("train", "test"):
        images = list(loaded[split][image_column])
        pixel_values = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
        labels = np.asarray(list(loaded[split][label_column]))
        if labels.dtype.kind not in "iu":
            labels = np.asarray([label_names.index(value) for value in labels])
        arrays[split] = (pixel_values, labels.astype(np.int64))
    return arrays, [str(label) for label in label_names]


def load_image_splits(
    dataset: str,
    validation_size: int = 5000,
    seed: int = 42,
    image_column: str = "image",
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> dict:
    """Load training, validation and test images as `float32` arrays `(n, channels, height, width)` in [0, 1].

    The validation split is a seeded random subset of the training set; the test set is kept for the final
    evaluation, cut to its first `max_eval_samples` images if given. Returns `{"train": (images, labels),
    "validation": ..., "test": ..., "label_names": [...], "test_size": <images in the whole test split>}`.
    """
    path = Path(dataset)
    if _is_mnist_folder(path):
        arrays = {}
        for split in ("train", "test"):
            images, labels = load_mnist(path, split)
            arrays[split] = ((images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64))
        label_names = [str(digit) for digit in range(10)]
    elif path.exists() or not dataset.startswith(("/", ".")):
        arrays, label_names = _load_datasets_splits(dataset, image_column, label_column)
    else:
        raise FileNotFoundError(f"--dataset {dataset} does not exist; pass a folder of MNIST IDX files or a dataset.")

    train_images, train_labels = arrays["train"]
    if not 0 < validation_size < len(train_labels):
        raise ValueError(
            f"validation_size={validation_size} must be between 1 and the {len(train_labels)} training images - 1."
        )
    order = np.random.default_rng(seed).permutation(len(train_labels))
    validation_index, train_index = order[:validation_size], order[validation_size:]
    if max_train_samples is not None:
        train_index = train_index[:max_train_samples]
    test_images, test_labels = arrays["test"]
    test_size = len(test_labels)
    if max_eval_samples is not None:
        validation_index = validation_index[:max_eval_samples]
        test_images, test_labels = test_images[:max_eval_samples], test_labels[:max_eval_samples]

    return {
        "train": (train_images[train_index], train_labels[train_index]),
        "validation": (train_images[validation_index], train_labels[validation_index]),
        "test": (test_images, test_labels),
        "label_names": label_names,
        "test_size": test_size,
    }
