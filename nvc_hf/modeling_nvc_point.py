"""NVC point-cloud models: a PointNet-style encoder, the NVC bottleneck, a classifier and a point decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput

from .configuration_nvc_point import NVCPointConfig
from .nebula import NVCBottleneck, ShapeCheckedLoadingMixin, check_class_labels


@dataclass
class NVCPointModelOutput(ModelOutput):
    """
    Output of [`NVCPointModel`].

    Args:
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`):
            Sampled latents in training mode, posterior means in eval mode.
        mean (`torch.FloatTensor` of shape `(batch, latent_size)`):
            Posterior means.
        logvar (`torch.FloatTensor` of shape `(batch, latent_size)`, *optional*):
            Posterior log-variances (`None` for `bottleneck_type="none"`).
        assignments (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Nearest anchor of each cloud (only with `bottleneck_type="nvc"`).
        anchor_distances (`torch.FloatTensor` of shape `(batch, num_anchors)`, *optional*):
            Squared distances from each mean to every anchor.
        nvc_loss (`torch.FloatTensor` of shape `()`):
            Weighted sum of the bottleneck's loss terms.
        kl_loss, nebula_loss, metric_loss (`torch.FloatTensor` of shape `()`):
            The bottleneck's loss terms, unweighted.
        cloud_features (`torch.FloatTensor` of shape `(batch, hidden_size)`):
            Pooled encoder feature handed to the bottleneck.
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
    cloud_features: torch.FloatTensor | None = None


@dataclass
class NVCPointCloudClassifierOutput(ModelOutput):
    """
    Output of [`NVCForPointCloudClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Total loss: classification (when `labels` are given) + weighted Chamfer distance + weighted NVC terms.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`):
            Classification scores before softmax.
        classification_loss, reconstruction_loss, kl_loss, nebula_loss, metric_loss (`torch.FloatTensor` of shape `()`):
            The loss terms, unweighted; `classification_loss` is `None` without labels and `reconstruction_loss`
            (the mean Chamfer distance) is `None` without a decoder.
        reconstruction (`torch.FloatTensor` of shape `(batch, num_decoder_points, 3)`, *optional*):
            Cloud decoded from the latent (`None` without a decoder).
        latents, mean, logvar, assignments, anchor_distances:
            As in [`NVCPointModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    classification_loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    anchor_distances: torch.FloatTensor | None = None


def chamfer_distance(
    predicted: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Chamfer distance between `predicted` `(batch, m, 3)` and `target` `(batch, n, 3)` clouds, per cloud `(batch,)`.

    The sum of two means of squared nearest-neighbour distances: from every predicted point to the target, and
    from every real target point to the prediction. Padded target points (`target_mask` 0) take no part.
    """
    predicted, target = predicted.float(), target.float()
    valid = None if target_mask is None else target_mask.bool()

    # The nearest neighbours come from the full (batch, m, n) distance matrix without autograd; the distances are
    # then recomputed for the matched pairs only. The value and gradient equal those of a min over the matrix,
    # but the backward pass touches (batch, m + n) pairs instead of the whole matrix.
    with torch.no_grad():
        # |p|^2 + |t|^2 - 2 p.t with one batched matmul, faster on CPU than torch.cdist followed by squaring.
        squared = torch.baddbmm(target.pow(2).sum(-1).unsqueeze(1), predicted, target.transpose(1, 2), alpha=-2)
        squared += predicted.pow(2).sum(-1).unsqueeze(2)
        # Columns of padded target points get an index too, but their distances are dropped below.
        nearest_in_prediction = squared.argmin(dim=1)
        if valid is not None:
            squared = squared.masked_fill(~valid.unsqueeze(1), float("inf"))
        nearest_in_target = squared.argmin(dim=2)

    matched_target = torch.gather(target, 1, nearest_in_target.unsqueeze(-1).expand(-1, -1, 3))
    to_target = (predicted - matched_target).pow(2).sum(-1).mean(1)
    matched_prediction = torch.gather(predicted, 1, nearest_in_prediction.unsqueeze(-1).expand(-1, -1, 3))
    target_to_prediction = (target - matched_prediction).pow(2).sum(-1)
    if valid is None:
        return to_target + target_to_prediction.mean(1)
    to_prediction = target_to_prediction.masked_fill(~valid, 0).sum(1) / valid.sum(1).clamp(min=1)
    return to_target + to_prediction


def check_points(points: torch.Tensor, point_mask: torch.Tensor | None, min_points: int, name: str = "points"):
    """Raise a clear error for clouds the model cannot take; return the boolean mask `(batch, points)`."""
    expected = "(batch, points, 3)"
    if not torch.is_tensor(points):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(points).__name__}.")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape {expected} with x, y, z in the last dimension, got {tuple(points.shape)}; "
            "add a batch dimension with points.unsqueeze(0) for a single cloud."
        )
    if points.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; pass at least one cloud.")
    if points.shape[1] == 0:
        raise ValueError(f"{name} contains empty clouds (0 points); each cloud needs at least {min_points} points.")
    if not torch.is_floating_point(points):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {points.dtype}.")

    if point_mask is None:
        valid = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
    else:
        if not torch.is_tensor(point_mask) or tuple(point_mask.shape) != tuple(points.shape[:2]):
            shape = tuple(point_mask.shape) if torch.is_tensor(point_mask) else type(point_mask).__name__
            raise ValueError(
                f"point_mask must have shape (batch, points) = {tuple(points.shape[:2])}, got {shape}; "
                "pass 1 for real points and 0 for padding."
            )
        if ((point_mask != 0) & (point_mask != 1)).any():
            raise ValueError("point_mask must contain only 0 (padding) and 1 (real point).")
        valid = point_mask.bool()

    counts = valid.sum(1)
    if (counts == 0).any():
        index = int((counts == 0).nonzero()[0])
        raise ValueError(f"Cloud {index} of {name} is empty: its point_mask has no real point.")
    if (counts < min_points).any():
        index = int((counts < min_points).nonzero()[0])
        raise ValueError(
            f"Cloud {index} of {name} has {int(counts[index])} points, fewer than min_points={min_points}; "
            "pass denser clouds or lower min_points in the config."
        )
    if not torch.isfinite(points[valid]).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates in real (unpadded) points.")
    return valid


class NVCPointPreTrainedModel(ShapeCheckedLoadingMixin, PreTrainedModel):
    config_class = NVCPointConfig
    base_model_prefix = "nvc"
    main_input_name = "points"
    # The losses are means over the batch, so Trainer must not rescale them by `num_items_in_batch`.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # Every write goes through `transformers.initialization`, which skips tensors loaded from a checkpoint,
        # so anchors and other weights survive `from_pretrained` bit for bit.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, NVCBottleneck):
            if module.anchors is not None:
                init.normal_(module.anchors)
            if module.ratio_offset_logit is not None:
                init.zeros_(module.ratio_offset_logit)


class NVCPointEncoder(nn.Module):
    """A shared per-point MLP, max pooling over the real points, and a linear map to `hidden_size`.

    Every layer acts on each point alone and the max is symmetric, so the feature does not depend on point order.
    Layer norm (per point) is used instead of batch norm so that padded points cannot leak into any statistic.
    """

    def __init__(self, config: NVCPointConfig):
        super().__init__()
        layers, size = [], 3
        for next_size in config.point_mlp_sizes:
            layers += [nn.Linear(size, next_size), nn.LayerNorm(next_size), nn.GELU()]
            size = next_size
        self.point_mlp = nn.Sequential(*layers)
        self.projection = nn.Linear(size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Map `(batch, points, 3)` clouds with a boolean mask `(batch, points)` to `(batch, hidden_size)` features."""
        features = self.point_mlp(points)
        if not valid.all():
            features = features.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        pooled = features.max(dim=1).values
        return self.dropout(F.gelu(self.projection(pooled)))


class NVCPointDecoder(nn.Module):
    """An MLP from the latent to `num_decoder_points` coordinates."""

    def __init__(self, config: NVCPointConfig):
        super().__init__()
        self.num_points = config.num_decoder_points
        self.layers = nn.Sequential(
            nn.Linear(config.latent_size, config.decoder_hidden_size),
            nn.GELU(),
            nn.Linear(config.decoder_hidden_size, config.decoder_hidden_size),
            nn.GELU(),
            nn.Linear(config.decoder_hidden_size, 3 * config.num_decoder_points),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Map `(batch, latent_size)` latents to `(batch, num_decoder_points, 3)` clouds."""
        return self.layers(latents).view(latents.shape[0], self.num_points, 3)


class NVCPointModel(NVCPointPreTrainedModel):
    """
    PointNet-style encoder followed by the NVC bottleneck. Returns the per-cloud latent, the anchor assignment and
    the anchor distances; use it for retrieval, clustering and latent plots.
    """

    def __init__(self, config: NVCPointConfig):
        super().__init__(config)
        self.encoder = NVCPointEncoder(config)
        self.bottleneck = NVCBottleneck.from_config(config, input_size=config.hidden_size)
        self.post_init()

    def forward(self, points: torch.Tensor, point_mask: torch.Tensor | None = None, **kwargs) -> NVCPointModelOutput:
        """
        Args:
            points (`torch.FloatTensor` of shape `(batch, points, 3)`):
                Clouds centred and scaled to the unit sphere, in any point order.
            point_mask (`torch.LongTensor` of shape `(batch, points)`, *optional*):
                1 for real points, 0 for padding, so that clouds of different sizes share a batch.
        """
        valid = check_points(points, point_mask, self.config.min_points)
        # Floating-point clouds of another precision (float64 from numpy, say) are cast to the weights' dtype.
        points = points.to(self.dtype)
        if point_mask is not None:
            # Padding may hold any value, NaN included; zero it so no arithmetic on it can misbehave.
            points = points.masked_fill(~valid.unsqueeze(-1), 0.0)
        features = self.encoder(points, valid)
        nebula = self.bottleneck(features)
        return NVCPointModelOutput(
            latents=nebula.latents,
            mean=nebula.mean,
            logvar=nebula.logvar,
            assignments=nebula.assignments,
            anchor_distances=nebula.anchor_distances,
            nvc_loss=nebula.loss,
            kl_loss=nebula.kl_loss,
            nebula_loss=nebula.nebula_loss,
            metric_loss=nebula.metric_loss,
            cloud_features=features,
        )


class NVCForPointCloudClassification(NVCPointPreTrainedModel):
    """
    [`NVCPointModel`] with a classifier on the latent and, when `reconstruction_weight > 0`, a decoder that
    reconstructs the cloud from the latent under the Chamfer distance. Passing a partial cloud as `points` and the
    whole cloud as `target_points` trains shape completion. Without labels the loss holds only the Chamfer and NVC
    terms, which is the label-free mode.
    """

    def __init__(self, config: NVCPointConfig):
        super().__init__(config)
        self.nvc = NVCPointModel(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.latent_size, config.classifier_hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden_size, config.num_labels),
        )
        self.decoder = NVCPointDecoder(config) if config.reconstruction_weight > 0 else None
        self.post_init()

    @property
    def bottleneck(self) -> NVCBottleneck:
        return self.nvc.bottleneck

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """
        Save like [`~PreTrainedModel.save_pretrained`], with `auto_map` mapping `AutoModel` to [`NVCPointModel`].

        transformers has no Auto class for point-cloud classification. `AutoModel` therefore loads the base model
        from this folder, with or without this package, as it does for every transformers model. The code of this
        head is copied into the folder as well, for loading it with `get_class_from_dynamic_module`.
        """
        # NVCPointModel is registered for `AutoModel` by the package, or by transformers after a remote-code load.
        registered = NVCPointModel._auto_class is not None
        if registered:
            module = NVCPointModel.__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{module}.{NVCPointModel.__name__}"
            self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if registered:
            custom_object_save(self, save_directory)

    def forward(
        self,
        points: torch.Tensor,
        point_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_points: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> NVCPointCloudClassifierOutput:
        """
        Args:
            points (`torch.FloatTensor` of shape `(batch, points, 3)`):
                Clouds centred and scaled to the unit sphere, in any point order.
            point_mask (`torch.LongTensor` of shape `(batch, points)`, *optional*):
                1 for real points, 0 for padding.
            labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Class indices in `[0, num_labels)`.
            target_points (`torch.FloatTensor` of shape `(batch, target_points, 3)`, *optional*):
                Cloud the decoder should reconstruct; defaults to `points` (auto-encoding). Pass the whole cloud
                here and a partial one as `points` for completion.
            target_mask (`torch.LongTensor` of shape `(batch, target_points)`, *optional*):
                Padding mask of `target_points`; defaults to `point_mask` when `target_points` is not given.
        """
        outputs = self.nvc(points, point_mask=point_mask)
        points = points.to(self.dtype)
        logits = self.classifier(outputs.latents)
        loss = outputs.nvc_loss

        classification_loss = None
        if labels is not None:
            labels = check_class_labels(labels, points.shape[0], self.config.num_labels)
            classification_loss = F.cross_entropy(logits.float(), labels)
            loss = loss + classification_loss

        reconstruction = reconstruction_loss = None
        if self.decoder is not None:
            if target_points is None:
                target_points, target_mask = points, point_mask
            else:
                check_points(target_points, target_mask, 1, name="target_points")
                target_points = target_points.to(self.dtype)
                if target_points.shape[0] != points.shape[0]:
                    raise ValueError(
                        f"target_points contains {target_points.shape[0]} clouds but points contains {points.shape[0]}."
                    )
            reconstruction = self.decoder(outputs.latents)
            reconstruction_loss = chamfer_distance(reconstruction, target_points, target_mask).mean()
            loss = loss + self.config.reconstruction_weight * reconstruction_loss

        return NVCPointCloudClassifierOutput(
            loss=loss,
            logits=logits,
            classification_loss=classification_loss,
            reconstruction_loss=reconstruction_loss,
            kl_loss=outputs.kl_loss,
            nebula_loss=outputs.nebula_loss,
            metric_loss=outputs.metric_loss,
            reconstruction=reconstruction,
            latents=outputs.latents,
            mean=outputs.mean,
            logvar=outputs.logvar,
            assignments=outputs.assignments,
            anchor_distances=outputs.anchor_distances,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode `(batch, latent_size)` latents into `(batch, num_decoder_points, 3)` clouds."""
        if self.decoder is None:
            raise ValueError("This model has no decoder; train it with reconstruction_weight > 0 to decode latents.")
        return self.decoder(latents)


__all__ = ["NVCPointPreTrainedModel", "NVCPointModel", "NVCForPointCloudClassification", "chamfer_distance"]
