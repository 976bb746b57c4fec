"""Dataset readers for the training scripts. Not part of the Hub remote code."""

from .images import load_image_splits
from .mnist import load_mnist, read_idx


__all__ = ["load_image_splits", "load_mnist", "read_idx"]
