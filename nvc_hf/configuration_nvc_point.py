"""Configuration of the NVC point-cloud models."""

from __future__ import annotations

from .configuration_nvc import NVCConfig, check_non_negative_float, check_positive_int


class NVCPointConfig(NVCConfig):
    r"""
    Configuration of [`NVCPointModel`] and [`NVCForPointCloudClassification`]: a PointNet-style encoder (a shared
    per-point MLP and max pooling over the points), the NVC bottleneck (fields of [`NVCConfig`]), a classifier and
    an optional decoder that reconstructs the cloud from the latent. The defaults describe the ModelNet10 model of
    this package.

    Args:
        point_mlp_sizes (`list[int]`, *optional*, defaults to `[64, 128, 256]`):
            Output sizes of the shared per-point layers (each a linear map, layer norm and GELU). The last one is
            the size of the pooled cloud feature.
        hidden_size (`int`, *optional*, defaults to 256):
            Size of the cloud feature handed to the bottleneck (a linear map after the pooling).
        classifier_hidden_size (`int`, *optional*, defaults to 128):
            Hidden size of the two-layer classifier on the latent.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the cloud feature and in the classifier.
        min_points (`int`, *optional*, defaults to 16):
            Minimum number of real points per cloud; a sparser cloud raises an error.
        reconstruction_weight (`float`, *optional*, defaults to 1.0):
            Weight of the decoder's Chamfer distance (mean squared nearest-neighbour distance in both directions,
            averaged over clouds); 0 builds no decoder.
        num_decoder_points (`int`, *optional*, defaults to 1024):
            Number of points the decoder outputs.
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Hidden size of the two-layer decoder MLP.
        num_labels (`int`, *optional*, defaults to 10):
            Number of classes.
        kl_weight, nebula_weight, metric_weight (`float`, *optional*, default to 0.01):
            Weights of the NVC terms. The KL and metric terms are sums over latent dimensions and reach tens of nats,
            so with weight 1 they drown the classification loss (about 2.3 nats at the start); 0.01 keeps both.

    Example:

    ```python
    >>> from nvc_hf import NVCPointConfig, NVCForPointCloudClassification
    >>> config = NVCPointConfig(point_mlp_sizes=[64, 128], reconstruction_weight=0)
    >>> model = NVCForPointCloudClassification(config)
    ```
    """

    model_type = "nvc-point"

    point_mlp_sizes: list[int] | tuple[int, ...] = (64, 128, 256)
    hidden_size: int = 256
    classifier_hidden_size: int = 128
    dropout: float = 0.2
    min_points: int = 16
    reconstruction_weight: float = 1.0
    num_decoder_points: int = 1024
    decoder_hidden_size: int = 512
    kl_weight: float = 0.01
    nebula_weight: float = 0.01
    metric_weight: float = 0.01

    def __post_init__(self, **kwargs):
        if self.id2label is None and "num_labels" not in kwargs:
            kwargs["num_labels"] = 10
        if "num_labels" in kwargs:
            # Checked before the base class turns it into id2label, which would hide a negative or NaN value.
            check_positive_int("num_labels", kwargs["num_labels"], minimum=2)
        if not isinstance(self.point_mlp_sizes, (list, tuple)):
            raise ValueError(
                f"point_mlp_sizes must be a list of layer sizes such as [64, 128, 256], got {self.point_mlp_sizes!r}."
            )
        self.point_mlp_sizes = list(self.point_mlp_sizes)
        if not self.point_mlp_sizes:
            raise ValueError("point_mlp_sizes must list at least one layer size, got an empty list.")
        for index, size in enumerate(self.point_mlp_sizes):
            check_positive_int(f"point_mlp_sizes[{index}]", size)
        check_positive_int("hidden_size", self.hidden_size)
        check_positive_int("classifier_hidden_size", self.classifier_hidden_size)
        check_non_negative_float("dropout", self.dropout)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        check_positive_int("min_points", self.min_points)
        check_non_negative_float("reconstruction_weight", self.reconstruction_weight)
        check_positive_int("num_decoder_points", self.num_decoder_points)
        check_positive_int("decoder_hidden_size", self.decoder_hidden_size)
        super().__post_init__(**kwargs)
        check_positive_int("num_labels", self.num_labels, minimum=2)


__all__ = ["NVCPointConfig"]
