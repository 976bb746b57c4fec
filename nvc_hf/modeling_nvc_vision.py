"""NVC image models: a convolutional encoder, the NVC bottleneck, a classifier and a convolutional decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_nvc_vision import NVCVisionConfig
from .nebula import NVCBottleneck, ShapeCheckedLoadingMixin, check_class_labels


@dataclass
class NVCVisionModelOutput(ModelOutput):
    """
    Output of [`NVCVisionModel`].

    Args:
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`):
            Sampled latents in training mode, posterior means in eval mode.
        mean (`torch.FloatTensor` of shape `(batch, latent_size)`):
            Posterior means.
        logvar (`torch.FloatTensor` of shape `(batch, latent_size)`, *optional*):
            Posterior log-variances (`None` for `bottleneck_type="none"`).
        assignments (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Nearest anchor of each image (only with `bottleneck_type="nvc"`).
        anchor_distances (`torch.FloatTensor` of shape `(batch, num_anchors)`, *optional*):
            Squared distances from each mean to every anchor.
        nvc_loss (`torch.FloatTensor` of shape `()`):
            Weighted sum of the bottleneck's loss terms.
        kl_loss, nebula_loss, metric_loss (`torch.FloatTensor` of shape `()`):
            The bottleneck's loss terms, unweighted.
        encoder_features (`torch.FloatTensor` of shape `(batch, hidden_size)`):
            Encoder output handed to the bottleneck.
    """

    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    anchor_distances: torch.FloatTensor | None = None
    nvc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None
    encoder_features: torch.FloatTensor | None = None


@dataclass
class NVCImageClassifierOutput(ModelOutput):
    """
    Output of [`NVCForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Total loss: classification (when `labels` are given) + weighted reconstruction + weighted NVC terms.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`):
            Classification scores before softmax.
        classification_loss, reconstruction_loss, kl_loss, nebula_loss, metric_loss (`torch.FloatTensor` of shape `()`):
            The loss terms, unweighted; `classification_loss` is `None` without labels and `reconstruction_loss` is
            `None` without a decoder.
        reconstruction_logits (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`, *optional*):
            Decoder output before the sigmoid (`None` without a decoder).
        latents, mean, logvar, assignments, anchor_distances:
            As in [`NVCVisionModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    classification_loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None
    reconstruction_logits: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    anchor_distances: torch.FloatTensor | None = None


class NVCVisionPreTrainedModel(ShapeCheckedLoadingMixin, PreTrainedModel):
    config_class = NVCVisionConfig
    base_model_prefix = "nvc"
    main_input_name = "pixel_values"
    # The losses are means over the batch, so Trainer must not rescale them by `num_items_in_batch`.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # Every write goes through `transformers.initialization`, which skips tensors loaded from a checkpoint,
        # so anchors and other weights survive `from_pretrained` bit for bit.
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = (
                    module.weight[0].numel()
                    if not isinstance(module, nn.ConvTranspose2d)
                    else module.weight[:, 0].numel()
                )
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, NVCBottleneck):
            if module.anchors is not None:
                init.normal_(module.anchors)
            if module.ratio_offset_logit is not None:
                init.zeros_(module.ratio_offset_logit)


class NVCImageEncoder(nn.Module):
    """Two convolutional stages (each ending in a stride-2 convolution) and a linear map to `hidden_size`."""

    def __init__(self, config: NVCVisionConfig):
        super().__init__()
        first, second = config.conv_channels
        self.convolutions = nn.Sequential(
            nn.Conv2d(config.num_channels, first, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(first, first, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(first, second, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(second, second, 3, stride=2, padding=1),
            nn.GELU(),
        )
        reduced = config.image_size // 4
        self.projection = nn.Linear(second * reduced * reduced, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map `(batch, num_channels, image_size, image_size)` images to `(batch, hidden_size)` features."""
        features = self.convolutions(pixel_values).flatten(1)
        return self.dropout(F.gelu(self.projection(features)))


class NVCImageDecoder(nn.Module):
    """Mirror of the encoder: a linear map from the latent, then two stride-2 transposed convolutions."""

    def __init__(self, config: NVCVisionConfig):
        super().__init__()
        first, second = config.conv_channels
        self.reduced = config.image_size // 4
        self.second = second
        self.projection = nn.Linear(config.latent_size, second * self.reduced * self.reduced)
        self.deconvolutions = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose2d(second, first, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(first, config.num_channels, 4, stride=2, padding=1),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Map `(batch, latent_size)` latents to `(batch, num_channels, image_size, image_size)` pixel logits."""
        features = self.projection(latents).view(-1, self.second, self.reduced, self.reduced)
        return self.deconvolutions(features)


def check_pixel_values(pixel_values: torch.Tensor, config: NVCVisionConfig) -> None:
    """Raise a clear error for images the model cannot take: wrong shape, integer dtype or non-finite values."""
    expected = f"(batch, {config.num_channels}, {config.image_size}, {config.image_size})"
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}; "
            "use the image processor to prepare images."
        )
    if tuple(pixel_values.shape[1:]) != (config.num_channels, config.image_size, config.image_size):
        raise ValueError(
            f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}; "
            "use the image processor to resize and convert the images."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch; pass at least one image.")
    if not torch.is_floating_point(pixel_values):
        raise TypeError(
            f"pixel_values must be a floating-point tensor with values in [0, 1], got dtype {pixel_values.dtype}; "
            "use the image processor, which rescales 0-255 integers to [0, 1]."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contains NaN or infinite values.")


class NVCVisionModel(NVCVisionPreTrainedModel):
    """
    Convolutional encoder followed by the NVC bottleneck. Returns latents, anchor assignments and the bottleneck's
    loss terms; use it for clustering, retrieval and latent plots.
    """

    def __init__(self, config: NVCVisionConfig):
        super().__init__(config)
        self.encoder = NVCImageEncoder(config)
        self.bottleneck = NVCBottleneck.from_config(config, input_size=config.hidden_size)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> NVCVisionModelOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`):
                Images with values in [0, 1], as returned by [`NVCImageProcessor`].
        """
        check_pixel_values(pixel_values, self.config)
        # Floating-point images of another precision (float64 from numpy, say) are cast to the weights' dtype.
        pixel_values = pixel_values.to(self.dtype)
        features = self.encoder(pixel_values)
        nebula = self.bottleneck(features)
        return NVCVisionModelOutput(
            latents=nebula.latents,
            mean=nebula.mean,
            logvar=nebula.logvar,
            assignments=nebula.assignments,
            anchor_distances=nebula.anchor_distances,
            nvc_loss=nebula.loss,
            kl_loss=nebula.kl_loss,
            nebula_loss=nebula.nebula_loss,
            metric_loss=nebula.metric_loss,
            encoder_features=features,
        )


class NVCForImageClassification(NVCVisionPreTrainedModel):
    """
    [`NVCVisionModel`] with a classifier on the latent and, when `reconstruction_weight > 0`, a decoder that
    reconstructs the image from the latent. Without labels the loss holds only the reconstruction and NVC terms,
    which is the label-free training mode.
    """

    def __init__(self, config: NVCVisionConfig):
        super().__init__(config)
        self.nvc = NVCVisionModel(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.latent_size, config.classifier_hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden_size, config.num_labels),
        )
        self.decoder = NVCImageDecoder(config) if config.reconstruction_weight > 0 else None
        self.post_init()

    @property
    def bottleneck(self) -> NVCBottleneck:
        return self.nvc.bottleneck

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> NVCImageClassifierOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`):
                Images with values in [0, 1].
            labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Class indices in `[0, num_labels)`.
        """
        outputs = self.nvc(pixel_values)
        pixel_values = pixel_values.to(self.dtype)
        logits = self.classifier(outputs.latents)
        loss = outputs.nvc_loss

        classification_loss = None
        if labels is not None:
            labels = check_class_labels(labels, pixel_values.shape[0], self.config.num_labels)
            classification_loss = F.cross_entropy(logits.float(), labels)
            loss = loss + classification_loss

        reconstruction_logits = reconstruction_loss = None
        if self.decoder is not None:
            reconstruction_logits = self.decoder(outputs.latents)
            reconstruction_loss = self.reconstruction_loss(reconstruction_logits, pixel_values)
            loss = loss + self.config.reconstruction_weight * reconstruction_loss

        return NVCImageClassifierOutput(
            loss=loss,
            logits=logits,
            classification_loss=classification_loss,
            reconstruction_loss=reconstruction_loss,
            kl_loss=outputs.kl_loss,
            nebula_loss=outputs.nebula_loss,
            metric_loss=outputs.metric_loss,
            reconstruction_logits=reconstruction_logits,
            latents=outputs.latents,
            mean=outputs.mean,
            logvar=outputs.logvar,
            assignments=outputs.assignments,
            anchor_distances=outputs.anchor_distances,
        )

    @staticmethod
    def reconstruction_loss(reconstruction_logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the reconstruction, summed over pixels and averaged over images."""
        if pixel_values.min() < 0 or pixel_values.max() > 1:
            raise ValueError(
                f"pixel_values must lie in [0, 1] for the reconstruction loss, got values from "
                f"{float(pixel_values.min()):.3g} to {float(pixel_values.max()):.3g}; do not normalise the images "
                "beyond rescaling (the image processor does this), or set reconstruction_weight=0."
            )
        per_pixel = F.binary_cross_entropy_with_logits(
            reconstruction_logits.float(), pixel_values.float(), reduction="none"
        )
        return per_pixel.flatten(1).sum(1).mean()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode `(batch, latent_size)` latents into `(batch, num_channels, image_size, image_size)` images in [0, 1]."""
        if self.decoder is None:
            raise ValueError("This model has no decoder; train it with reconstruction_weight > 0 to decode latents.")
        return torch.sigmoid(self.decoder(latents))

    @torch.no_grad()
    def sample_around_anchors(self, samples_per_anchor: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode latents drawn from `N(a_i, I)` around every anchor.

        Returns images of shape `(num_anchors, samples_per_anchor, num_channels, image_size, image_size)`.
        """
        anchors = self.bottleneck.anchors
        if anchors is None:
            raise ValueError(f"bottleneck_type={self.config.bottleneck_type!r} has no anchors to sample around.")
        noise = torch.randn(
            anchors.shape[0], samples_per_anchor, anchors.shape[1], generator=generator, device=anchors.device
        )
        latents = (anchors.unsqueeze(1) + noise).reshape(-1, anchors.shape[1])
        images = self.decode(latents)
        return images.view(anchors.shape[0], samples_per_anchor, *images.shape[1:])


__all__ = ["NVCVisionPreTrainedModel", "NVCVisionModel", "NVCForImageClassification"]
