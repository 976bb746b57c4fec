"""Dataset readers for the training scripts. Not part of the Hub remote code."""

from .images import load_image_splits
from .mnist import load_mnist, read_idx
from .pointclouds import PCDError, load_modelnet, load_modelnet_splits, read_pcd


__all__ = [
    "PCDError",
    "load_image_splits",
    "load_mnist",
    "load_modelnet",
    "load_modelnet_splits",
    "read_idx",
    "read_pcd",
]
