"""Parallel text for the translation scripts: line-aligned files (plain or gzip) or a `datasets` dataset.

Every reader checks what it reads and raises an error naming the file and line; nothing is silently truncated.
"""

from __future__ import annotations

import gzip
from pathlib import Path


# Split names of the Multi30k task 1 release, as stored in `data/multi30k` (`<split>.<language>.gz`).
MULTI30K_SPLITS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}


def read_lines(path: str | Path) -> list[str]:
    """Read one sentence per line from a UTF-8 text file (gzip if the name ends in `.gz`).

    Raises `ValueError` naming the file and line for undecodable bytes, an empty file or an empty line, because
    an empty line in one language would pair every later sentence with the wrong translation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Parallel text file {path} not found.")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()

    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: invalid UTF-8 at byte {error.start} ({line[error.start : error.start + 4]!r}); "
                "convert the file to UTF-8."
            ) from None
        lines.append(text.rstrip("\r"))

    # A final newline ends the last line; it does not start an empty one.
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty; a parallel text file needs one sentence per line.")
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            raise ValueError(
                f"{path}, line {number}: empty line; remove the pair from both files so the lines stay aligned."
            )
    return lines


def read_parallel_files(source_path: str | Path, target_path: str | Path) -> tuple[list[str], list[str]]:
    """Read two line-aligned files; raise `ValueError` naming both files if their line counts differ."""
    sources = read_lines(source_path)
    targets = read_lines(target_path)
    if len(sources) != len(targets):
        shorter, longer = (source_path, target_path) if len(sources) < len(targets) else (target_path, source_path)
        raise ValueError(
            f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; {shorter} ends at line "
            f"{min(len(sources), len(targets))}, so line {min(len(sources), len(targets)) + 1} of {longer} has no "
            "translation. The files must be line-aligned."
        )
    return sources, targets


def load_multi30k(folder: str | Path, source_language: str = "de", target_language: str = "en") -> dict:
    """Load the train, validation and test_2016_flickr splits of a Multi30k folder.

    Returns `{"train": (sources, targets), "validation": ..., "test": ...}`.
    """
    folder = Path(folder)
    splits = {}
    for split, stem in MULTI30K_SPLITS.items():
        splits[split] = read_parallel_files(
            folder / f"{stem}.{source_language}.gz", folder / f"{stem}.{target_language}.gz"
        )
    return splits


def load_dataset_pairs(dataset, source_column: str, target_column: str, name: str = "dataset") -> tuple[list, list]:
    """Extract (sources, targets) from a `datasets.Dataset` with one column per language.

    Raises `ValueError` naming the row for a missing or empty sentence.
    """
    for column in (source_column, target_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"Column {column!r} not found in {name} (columns: {dataset.column_names}); set --source_column "
                "and --target_column."
            )
    sources = list(dataset[source_column])
    targets = list(dataset[target_column])
    for column, values in ((source_column, sources), (target_column, targets)):
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}, row {row}, column {column!r}: expected a non-empty string, got {value!r}.")
    return sources, targets


__all__ = ["MULTI30K_SPLITS", "load_dataset_pairs", "load_multi30k", "read_lines", "read_parallel_files"]
