"""Configuration of the NVC image models."""

from __future__ import annotations

from .configuration_nvc import NVCConfig, check_non_negative_float, check_positive_int


class NVCVisionConfig(NVCConfig):
    r"""
    Configuration of [`NVCVisionModel`] and [`NVCForImageClassification`]: a small convolutional encoder, the NVC
    bottleneck (fields of [`NVCConfig`]), a classifier and an optional convolutional decoder. The defaults describe
    the MNIST demo model of this package.

    Args:
        num_channels (`int`, *optional*, defaults to 1):
            Channels of the input images.
        image_size (`int`, *optional*, defaults to 28):
            Height and width of the (square) input images; the encoder halves it twice, so it must be divisible by 4.
        conv_channels (`list[int]`, *optional*, defaults to `[32, 64]`):
            Channels of the two convolutional stages; each stage ends with a stride-2 convolution.
        hidden_size (`int`, *optional*, defaults to 256):
            Size of the encoder feature handed to the bottleneck.
        classifier_hidden_size (`int`, *optional*, defaults to 128):
            Hidden size of the two-layer classifier on the latent.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the encoder feature and in the classifier.
        reconstruction_weight (`float`, *optional*, defaults to 0.01):
            Weight of the decoder's reconstruction loss (binary cross-entropy summed over pixels, averaged over
            images); 0 builds no decoder.
        num_labels (`int`, *optional*, defaults to 10):
            Number of classes.
        kl_weight, nebula_weight, metric_weight (`float`, *optional*, default to 0.01):
            Weights of the NVC terms. The KL and metric terms are sums over latent dimensions and reach tens of nats,
            so with weight 1 they drown the classification loss (about 2.3 nats at the start) and the classifier
            never leaves chance level; 0.01 keeps both. Label-free training uses 1, the authors' reference.

    Example:

    ```python
    >>> from nvc_hf import NVCVisionConfig, NVCForImageClassification
    >>> config = NVCVisionConfig(num_anchors=10, kl_prior="standard")
    >>> model = NVCForImageClassification(config)
    ```
    """

    model_type = "nvc-vision"

    num_channels: int = 1
    image_size: int = 28
    conv_channels: list[int] | tuple[int, ...] = (32, 64)
    hidden_size: int = 256
    classifier_hidden_size: int = 128
    dropout: float = 0.1
    reconstruction_weight: float = 0.01
    kl_weight: float = 0.01
    nebula_weight: float = 0.01
    metric_weight: float = 0.01

    def __post_init__(self, **kwargs):
        if self.id2label is None and "num_labels" not in kwargs:
            kwargs["num_labels"] = 10
        if "num_labels" in kwargs:
            # Checked before the base class turns it into id2label, which would hide a negative or NaN value.
            check_positive_int("num_labels", kwargs["num_labels"], minimum=2)
        if not isinstance(self.conv_channels, (list, tuple)):
            raise ValueError(
                f"conv_channels must be a list of two channel counts such as [32, 64], got {self.conv_channels!r}."
            )
        self.conv_channels = list(self.conv_channels)
        check_positive_int("num_channels", self.num_channels)
        check_positive_int("image_size", self.image_size, minimum=4)
        if self.image_size % 4 != 0:
            raise ValueError(
                f"image_size must be divisible by 4 (the encoder halves it twice), got {self.image_size}."
            )
        if len(self.conv_channels) != 2:
            raise ValueError(f"conv_channels must list two channel counts, got {self.conv_channels!r}.")
        for index, channels in enumerate(self.conv_channels):
            check_positive_int(f"conv_channels[{index}]", channels)
        check_positive_int("hidden_size", self.hidden_size)
        check_positive_int("classifier_hidden_size", self.classifier_hidden_size)
        check_non_negative_float("dropout", self.dropout)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        check_non_negative_float("reconstruction_weight", self.reconstruction_weight)
        super().__post_init__(**kwargs)
        check_positive_int("num_labels", self.num_labels, minimum=2)


__all__ = ["NVCVisionConfig"]
