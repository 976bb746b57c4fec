"""The Nebula Variational Coding (NVC) bottleneck.

Method: Y. Wang, D. J. Tan, N. Navab, F. Tombari, "Self-supervised Latent Space Optimization with
Nebula Variational Coding", IEEE TPAMI 46(3), 2024. A feature `h` is mapped to a Gaussian posterior
`N(mean, exp(logvar))`; learnable *nebula anchors* live in the latent space, every latent is assigned
to its nearest anchor, and three loss terms shape the clusters:

- the nebula loss `sum_{i<j} M_i M_j D(a_i, a_j)`, with the mass `M_i = 1 + sum ||mean - a_i||^2` over
  the latents assigned to anchor `i` and an inverse anchor distance `D`;
- a KL term towards `N(0, I)` (`kl_prior="standard"`) or towards `N(a_k, I)` (`kl_prior="anchor"`);
- a metric loss that uses the nearest-anchor index as a pseudo-label (`"triplet"` or `"ratio"`).

This file is part of the Hub remote code: it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


BOTTLENECK_TYPES = ("nvc", "vae", "none")
KL_PRIORS = ("standard", "anchor")
METRIC_LOSSES = ("triplet", "ratio")
NEBULA_DISTANCES = ("softplus", "clamp", "raw")
MASS_REDUCTIONS = ("mean", "sum")

# Anchor health rules: usage is an exponential moving average of assignments per batch, and an
# anchor whose average drops below `DEAD_ANCHOR_THRESHOLD` is moved onto a latent of the batch.
USAGE_EMA_DECAY = 0.99
DEAD_ANCHOR_THRESHOLD = 0.5
# Number of warm-up means kept for the k-means initialisation of the anchors.
KMEANS_SAMPLE_SIZE = 2048
KMEANS_ITERATIONS = 10
# `nebula_radius="auto"` sets the radius to this fraction of the median pairwise anchor distance.
AUTO_RADIUS_FRACTION = 0.05


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """Raise `ValueError` unless `value` is an integer (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_non_negative_float(name: str, value, strictly_positive: bool = False) -> None:
    """Raise `ValueError` unless `value` is a finite real number, >= 0 (or > 0 with `strictly_positive`)."""
    bound = "> 0" if strictly_positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    if value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}.")


def check_class_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> torch.Tensor:
    """Raise a clear error for labels that are not class indices in `[0, num_labels)`; return them as `torch.long`."""
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}.")
    if torch.is_floating_point(labels) or torch.is_complex(labels) or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must hold integer class indices, got dtype {labels.dtype}; convert with labels.long()."
        )
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(
            f"labels must lie in [0, {num_labels}), got values from {int(labels.min())} to "
            f"{int(labels.max())}; set num_labels in the config to the number of classes."
        )
    return labels.long()


class ShapeCheckedLoadingMixin:
    """Make `from_pretrained` errors name the broken weights file or every tensor of the wrong shape.

    transformers lists mismatched tensors only in a logged report. On that error this mixin loads once more with
    `ignore_mismatched_sizes=True` to read them, then raises a `RuntimeError` that lists them. An unreadable
    safetensors file raises `OSError` naming the model. Put the mixin before `PreTrainedModel` among the bases.
    """

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        try:
            return super().from_pretrained(*args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error) or kwargs.get("ignore_mismatched_sizes"):
                raise
            original = error
        except Exception as error:
            # Matched by name because remote code may import only torch, transformers and the standard library.
            if type(error).__name__ != "SafetensorError":
                raise
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(
                f"The safetensors weights of {source} cannot be read ({error}); the file is truncated or corrupt. "
                "Download or save the model again."
            ) from error
        _, loading_info = super().from_pretrained(
            *args, **{**kwargs, "ignore_mismatched_sizes": True, "output_loading_info": True}
        )
        mismatched = sorted(loading_info["mismatched_keys"])
        listed = "; ".join(
            f"{key}: checkpoint {tuple(saved)}, config {tuple(built)}" for key, saved, built in mismatched
        )
        raise RuntimeError(
            f"{len(mismatched)} checkpoint tensors do not match the shapes the config builds ({listed}). Load the "
            "checkpoint with its own config.json, or pass ignore_mismatched_sizes=True to re-initialise them."
        ) from original


@dataclass
class NebulaOutput(ModelOutput):
    """
    Output of [`NVCBottleneck`]. Leading dimensions `...` are those of the input feature: `(batch,)` or
    `(batch, length)`.

    Args:
        latents (`torch.FloatTensor` of shape `(..., latent_size)`):
            Sampled latents `z = mean + exp(logvar / 2) * eps` in training mode, `mean` in eval mode.
        mean (`torch.FloatTensor` of shape `(..., latent_size)`):
            Posterior mean.
        logvar (`torch.FloatTensor` of shape `(..., latent_size)`, *optional*):
            Posterior log-variance; `None` for the deterministic bottleneck (`bottleneck_type="none"`).
        assignments (`torch.LongTensor` of shape `(...)`, *optional*):
            Index of the nearest anchor to each mean; `-1` at padded positions. `None` without anchors.
        anchor_distances (`torch.FloatTensor` of shape `(..., num_anchors)`, *optional*):
            Squared Euclidean distance from each mean to every anchor. `None` without anchors.
        loss (`torch.FloatTensor` of shape `()`):
            Weighted sum `kl_weight * kl_loss + nebula_weight * nebula_loss + metric_weight * metric_loss`.
        kl_loss (`torch.FloatTensor` of shape `()`):
            KL divergence summed over latent dimensions, averaged over unpadded positions.
        nebula_loss (`torch.FloatTensor` of shape `()`):
            Gravitational nebula loss (zero before the anchors are initialised).
        metric_loss (`torch.FloatTensor` of shape `()`):
            Self-supervised metric loss on the pseudo-labels (zero before the anchors are initialised).
    """

    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    anchor_distances: torch.FloatTensor | None = None
    loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the `(n, m)` matrix of squared Euclidean distances between rows of `x` `(n, d)` and `y` `(m, d)`.

    The expansion `|x|^2 - 2 x.y + |y|^2` keeps memory at `O(n m)`; it is clamped at zero because rounding
    can make it slightly negative.
    """
    distances = x.pow(2).sum(-1, keepdim=True) - 2 * x @ y.T + y.pow(2).sum(-1).unsqueeze(0)
    return distances.clamp_min(0.0)


def pairwise_anchor_distances(anchors: torch.Tensor) -> torch.Tensor:
    """Return the `(m, m)` squared distances between anchors `(m, d)`, with an exact zero diagonal.

    This uses the expansion of [`squared_distances`], one `(m, m)` matrix product. An `(m, m, d)` tensor of
    differences made the bottleneck's training step about 4 times slower at 300 anchors. Coincident anchors get a
    distance of rounding size rather than an exact zero, and `eps` in [`inverse_anchor_distance`] keeps their loss
    finite.
    """
    distances = squared_distances(anchors, anchors)
    diagonal = torch.eye(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return distances.masked_fill(diagonal, 0.0)


def anchor_masses(
    distances_to_anchors: torch.Tensor, assignments: torch.Tensor, num_anchors: int, reduction: str
) -> torch.Tensor:
    """Compute the mass `M_i = 1 + sum_{k(x)=i} ||mean(x) - a_i||^2` of every anchor.

    Args:
        distances_to_anchors: `(n, m)` squared distances of the unpadded means to all anchors.
        assignments: `(n,)` nearest-anchor indices.
        num_anchors: `m`.
        reduction: `"sum"` adds the distances (the paper's formula); `"mean"` divides the sum by `n`, so the
            mass does not grow with the batch size or the number of processes.
    """
    own_distances = distances_to_anchors.gather(1, assignments.unsqueeze(1)).squeeze(1)
    summed = torch.zeros(num_anchors, dtype=own_distances.dtype, device=own_distances.device)
    summed = summed.index_add(0, assignments, own_distances)
    if reduction == "mean":
        summed = summed / max(own_distances.shape[0], 1)
    return 1.0 + summed


def inverse_anchor_distance(
    anchor_distances: torch.Tensor, form: str, radius: float | torch.Tensor, eps: float
) -> torch.Tensor:
    """Compute the inverse distance `D(a_i, a_j)` from squared anchor distances `d^2` of any shape.

    - `"softplus"`: `log(1 + r^2 / d^2)`, positive and decaying beyond the radius `r`;
    - `"clamp"`: `max(0, -log(d^2 / r^2))`, no force beyond `r`;
    - `"raw"`: the literal `-log d^2`, negative for anchors more than one unit apart.

    `eps` is added to `d^2`, so coincident anchors give a large but finite value.
    """
    squared = anchor_distances + eps
    if form == "raw":
        return -torch.log(squared)
    log_ratio = torch.log(squared) - 2 * torch.log(torch.as_tensor(radius, dtype=squared.dtype))
    if form == "softplus":
        return F.softplus(-log_ratio)
    if form == "clamp":
        return F.relu(-log_ratio)
    raise ValueError(f"Unknown nebula_distance {form!r}; expected one of {NEBULA_DISTANCES}.")


def nebula_loss(
    distances_to_anchors: torch.Tensor,
    assignments: torch.Tensor,
    anchors: torch.Tensor,
    form: str = "softplus",
    radius: float | torch.Tensor = 1.0,
    eps: float = 1e-6,
    mass_reduction: str = "mean",
) -> torch.Tensor:
    """Compute the gravitational nebula loss `sum_{i<j} M_i M_j D(a_i, a_j)`.

    Args:
        distances_to_anchors: `(n, m)` squared distances of the unpadded means to the anchors.
        assignments: `(n,)` nearest-anchor indices.
        anchors: `(m, d)` anchors.
    """
    num_anchors = anchors.shape[0]
    masses = anchor_masses(distances_to_anchors, assignments, num_anchors, mass_reduction)
    inverse_distances = inverse_anchor_distance(pairwise_anchor_distances(anchors), form, radius, eps)
    pair_masses = masses.unsqueeze(1) * masses.unsqueeze(0)
    # The strict upper triangle contains each pair `i < j` once.
    return torch.triu(pair_masses * inverse_distances, diagonal=1).sum()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Compute `KL(N(mean, exp(logvar)) || N(prior_mean, I))`, summed over the last dimension and averaged over rows.

    `prior_mean=None` is the standard normal prior. Inputs are `(n, d)`.
    """
    centred = mean if prior_mean is None else mean - prior_mean
    per_row = 0.5 * (logvar.exp() + centred.pow(2) - 1.0 - logvar).sum(-1)
    return per_row.mean() if per_row.numel() > 0 else per_row.sum()


def _hardest_pairs(latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return, for each row, the largest squared distance to a same-label row, the smallest to another label,
    and a mask of rows that have both.

    The hardest partners are chosen without autograd. Only the `2 n` chosen distances are then recomputed with
    gradients, so the backward pass never visits the `(n, n)` distance matrix. The values and gradients are
    those of taking the maximum and minimum over the matrix, apart from how exact ties share the gradient.
    """
    with torch.no_grad():
        distances = squared_distances(latents, latents)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        positive_scores = distances.masked_fill(~same, float("-inf")).fill_diagonal_(float("-inf"))
        farthest_positive, positive_index = positive_scores.max(1)
        nearest_negative, negative_index = distances.masked_fill(same, float("inf")).min(1)
        valid = (farthest_positive > float("-inf")) & (nearest_negative < float("inf"))

    hardest_positive = (latents - latents[positive_index]).pow(2).sum(-1)
    hardest_negative = (latents - latents[negative_index]).pow(2).sum(-1)
    return hardest_positive, hardest_negative, valid


def triplet_loss(latents: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Compute the batch-hard triplet loss `mean(max(0, d(z, z_pos) - d(z, z_neg) + margin))` on squared distances.

    Rows without a positive or without a negative in the batch are left out. A batch where every row has
    the same label returns zero (with a gradient path), never NaN.
    """
    hardest_positive, hardest_negative, valid = _hardest_pairs(latents, labels)
    num_valid = valid.sum()
    if num_valid == 0:
        return latents.sum() * 0.0
    losses = F.relu(hardest_positive - hardest_negative + margin)
    return (losses * valid).sum() / num_valid


def ratio_loss(latents: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Compute the margin-free ratio loss `mean(d(z, z_pos) / (d(z, z_neg) + s))` with a learned `s` in (0, 1).

    Rows without a positive or without a negative are left out, as in [`triplet_loss`].
    """
    hardest_positive, hardest_negative, valid = _hardest_pairs(latents, labels)
    if not valid.any():
        return latents.sum() * 0.0 + offset * 0.0
    ratios = hardest_positive[valid] / (hardest_negative[valid] + offset)
    return ratios.mean()


def kmeans(points: torch.Tensor, num_clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster `points` `(n, d)` into `num_clusters` centroids with k-means++ seeding and Lloyd iterations.

    An empty cluster keeps its previous centroid. `n` must be at least `num_clusters`.
    """
    num_points = points.shape[0]
    first = torch.randint(num_points, (1,), generator=generator, device=points.device)
    centroids = points[first]
    closest = squared_distances(points, centroids).squeeze(1)
    for _ in range(1, num_clusters):
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        chosen = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, points[chosen]])
        closest = torch.minimum(closest, squared_distances(points, points[chosen]).squeeze(1))

    for _ in range(iterations):
        labels = squared_distances(points, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add(0, labels, points)
        counts = torch.bincount(labels, minlength=num_clusters).unsqueeze(1).to(points.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def _unpadded(values: torch.Tensor, valid: torch.Tensor | None, leading_dims: int) -> torch.Tensor:
    """Gather the unpadded positions of `values` `(*leading, ...)` into `(positions, ...)`.

    `valid` is the boolean padding mask of shape `leading` (`leading_dims` dimensions), or `None` when every
    position is real. Without a mask a reshape is enough, which spares the copy of boolean indexing and its
    backward scatter.
    """
    if valid is None:
        return values.reshape(-1, *values.shape[leading_dims:])
    return values[valid]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NVCBottleneck(nn.Module):
    """
    Variational bottleneck with nebula anchors, usable after any encoder.

    Args:
        input_size: size `d_in` of the incoming feature.
        latent_size: latent size `d`.
        num_anchors: number of nebula anchors `m`.
        bottleneck_type: `"nvc"` (anchors and all NVC losses), `"vae"` (a plain variational bottleneck with a
            standard normal prior and no anchors) or `"none"` (a deterministic linear map, `z = mean`).
        kl_prior, metric_loss, nebula_distance, mass_reduction: see [`NVCConfig`].
        nebula_radius: separation radius `r`, or `"auto"` for `AUTO_RADIUS_FRACTION` times the median
            pairwise anchor distance at initialisation.
        nebula_eps: added to squared anchor distances.
        metric_margin: triplet margin `alpha`.
        kl_weight, nebula_weight, metric_weight: weights of the three terms in `loss`.
        anchor_warmup_steps: optimizer steps trained as a plain VAE before the anchors are set by k-means.
        metric_max_samples: the metric loss compares at most this many latents per batch (a random subset),
            because its cost grows with the square of the count.

    Example:

    ```python
    >>> bottleneck = NVCBottleneck(input_size=128, latent_size=16, num_anchors=10, anchor_warmup_steps=0)
    >>> output = bottleneck(torch.randn(64, 128))
    >>> output.latents.shape, output.assignments.shape
    (torch.Size([64, 16]), torch.Size([64]))
    ```

    Training loops call [`~NVCBottleneck.update_anchors`] after every optimizer step: it initialises the anchors
    once the warm-up is over and reseeds dead anchors.
    """

    def __init__(
        self,
        input_size: int,
        latent_size: int = 32,
        num_anchors: int = 30,
        bottleneck_type: str = "nvc",
        kl_prior: str = "anchor",
        metric_loss: str = "triplet",
        nebula_distance: str = "softplus",
        nebula_radius: float | str = "auto",
        nebula_eps: float = 1e-6,
        mass_reduction: str = "mean",
        metric_margin: float = 1.0,
        kl_weight: float = 1.0,
        nebula_weight: float = 1.0,
        metric_weight: float = 1.0,
        anchor_warmup_steps: int = 0,
        metric_max_samples: int = 1024,
    ):
        super().__init__()
        check_choice("bottleneck_type", bottleneck_type, BOTTLENECK_TYPES)
        check_positive_int("input_size", input_size)
        check_positive_int("latent_size", latent_size)
        check_positive_int("num_anchors", num_anchors, minimum=2)
        check_choice("kl_prior", kl_prior, KL_PRIORS)
        check_choice("metric_loss", metric_loss, METRIC_LOSSES)
        check_choice("nebula_distance", nebula_distance, NEBULA_DISTANCES)
        check_choice("mass_reduction", mass_reduction, MASS_REDUCTIONS)
        if nebula_radius != "auto":
            check_non_negative_float("nebula_radius (or the string 'auto')", nebula_radius, strictly_positive=True)
        self.bottleneck_type = bottleneck_type
        self.latent_size = latent_size
        self.num_anchors = num_anchors
        self.kl_prior = kl_prior
        self.metric_loss_type = metric_loss
        self.nebula_distance = nebula_distance
        self.nebula_radius = nebula_radius
        self.nebula_eps = nebula_eps
        self.mass_reduction = mass_reduction
        self.metric_margin = metric_margin
        self.kl_weight = kl_weight
        self.nebula_weight = nebula_weight
        self.metric_weight = metric_weight
        self.anchor_warmup_steps = anchor_warmup_steps
        self.metric_max_samples = metric_max_samples

        self.mean_projection = nn.Linear(input_size, latent_size)
        self.logvar_projection = nn.Linear(input_size, latent_size) if bottleneck_type != "none" else None

        if bottleneck_type == "nvc":
            self.anchors = nn.Parameter(torch.randn(num_anchors, latent_size))
            # Pre-sigmoid value of the ratio loss offset `s`; only used with `metric_loss="ratio"`.
            self.ratio_offset_logit = nn.Parameter(torch.zeros(())) if metric_loss == "ratio" else None
            self.register_buffer("anchors_initialized", torch.zeros((), dtype=torch.bool))
            self.register_buffer("radius", torch.tensor(1.0 if nebula_radius == "auto" else float(nebula_radius)))
            self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
            self.register_buffer("anchor_usage", torch.zeros(num_anchors))
            self.register_buffer("num_reseeded", torch.zeros((), dtype=torch.long))
        else:
            self.anchors = None
            self.ratio_offset_logit = None

        # Training-time state that is not saved: warm-up means for k-means, assignment counts since the last
        # optimizer step, and the means of the last batch (candidates for reseeding).
        self._warmup_means: list[torch.Tensor] = []
        # Control runs set `freeze_anchors_after_init`: the k-means anchors then stay fixed and none is reseeded.
        self.freeze_anchors_after_init = False
        self._frozen_anchors: torch.Tensor | None = None
        self._pending_counts: torch.Tensor | None = None
        self._pending_batch_size = 0
        self._last_means: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, input_size: int) -> NVCBottleneck:
        """Build a bottleneck from any config that carries the fields of [`NVCConfig`]."""
        return cls(
            input_size=input_size,
            latent_size=config.latent_size,
            num_anchors=config.num_anchors,
            bottleneck_type=config.bottleneck_type,
            kl_prior=config.kl_prior,
            metric_loss=config.metric_loss,
            nebula_distance=config.nebula_distance,
            nebula_radius=config.nebula_radius,
            nebula_eps=config.nebula_eps,
            mass_reduction=config.mass_reduction,
            metric_margin=config.metric_margin,
            kl_weight=config.kl_weight,
            nebula_weight=config.nebula_weight,
            metric_weight=config.metric_weight,
            anchor_warmup_steps=config.anchor_warmup_steps,
            metric_max_samples=config.metric_max_samples,
        )

    @property
    def has_anchors(self) -> bool:
        return self.anchors is not None

    @property
    def nvc_active(self) -> bool:
        """Whether the anchor losses are on: an NVC bottleneck whose anchors have been initialised."""
        return self.has_anchors and bool(self.anchors_initialized)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, return_loss: bool = True
    ) -> NebulaOutput:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch, input_size)` or `(batch, length, input_size)`):
                Features from the host network.
            attention_mask (`torch.Tensor` of shape `(batch,)` or `(batch, length)`, *optional*):
                1 for real positions, 0 for padding. Padded positions take part in no loss and no assignment.
            return_loss (`bool`, *optional*, defaults to `True`):
                Compute the loss terms. With `False` the loss fields are `None`, and no random numbers are drawn
                in eval mode; latents, means, log-variances and assignments are the same as with `True`.
        """
        if hidden_states.dim() not in (2, 3):
            raise ValueError(
                "NVCBottleneck expects features of shape (batch, input_size) or (batch, length, input_size), "
                f"got shape {tuple(hidden_states.shape)}."
            )
        input_size = self.mean_projection.in_features
        if hidden_states.shape[-1] != input_size:
            raise ValueError(
                f"NVCBottleneck was built with input_size={input_size} but got features of width "
                f"{hidden_states.shape[-1]} (shape {tuple(hidden_states.shape)}); build it with the host's feature size."
            )
        if not torch.is_floating_point(hidden_states):
            raise TypeError(f"NVCBottleneck expects floating-point features, got dtype {hidden_states.dtype}.")
        weight_dtype = self.mean_projection.weight.dtype
        if hidden_states.dtype != weight_dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            hidden_states = hidden_states.to(weight_dtype)
        leading_shape = hidden_states.shape[:-1]
        leading_dims = len(leading_shape)
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != leading_shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the features need "
                    f"{tuple(leading_shape)}; pass one entry per position."
                )
            valid = attention_mask.bool()
        # Only unpadded positions must be finite: hosts may leave anything at padding.
        if not torch.isfinite(_unpadded(hidden_states, valid, leading_dims)).all():
            raise FloatingPointError(
                "NVCBottleneck received NaN or infinite features: the input or the host network has diverged. "
                "Check the input values, or lower the learning rate."
            )

        mean = self.mean_projection(hidden_states)
        if self.logvar_projection is None:
            if not return_loss:
                return NebulaOutput(latents=mean, mean=mean)
            zero = mean.new_zeros((), dtype=torch.float32)
            return NebulaOutput(latents=mean, mean=mean, loss=zero, kl_loss=zero, nebula_loss=zero, metric_loss=zero)

        logvar = self.logvar_projection(hidden_states)
        if self.training:
            latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        else:
            latents = mean

        if not return_loss:
            assignments, anchor_distances = self._assign_to_anchors(mean, valid)
            if self.training and assignments is not None:
                self._record_batch(
                    _unpadded(mean, valid, leading_dims).detach().float(), _unpadded(assignments, valid, leading_dims)
                )
            return NebulaOutput(
                latents=latents, mean=mean, logvar=logvar, assignments=assignments, anchor_distances=anchor_distances
            )

        # Losses are computed in float32 on the unpadded positions, also under fp16/bf16 autocast.
        zero = mean.new_zeros((), dtype=torch.float32)
        flat_mean = _unpadded(mean, valid, leading_dims).float()
        flat_logvar = _unpadded(logvar, valid, leading_dims).float()
        flat_latents = _unpadded(latents, valid, leading_dims).float()

        nebula_term = metric_term = zero
        assignments, anchor_distances = self._assign_to_anchors(mean, valid)
        if self.has_anchors:
            anchors = self.anchors.float()
            flat_distances = _unpadded(anchor_distances, valid, leading_dims)
            flat_assignments = _unpadded(assignments, valid, leading_dims)
            if self.training:
                self._record_batch(flat_mean.detach(), flat_assignments)

        if self.nvc_active:
            prior_mean = anchors[flat_assignments] if self.kl_prior == "anchor" else None
            kl_term = kl_divergence(flat_mean, flat_logvar, prior_mean)
            if flat_mean.shape[0] > 0:
                nebula_term = nebula_loss(
                    flat_distances,
                    flat_assignments,
                    anchors,
                    form=self.nebula_distance,
                    radius=self.radius,
                    eps=self.nebula_eps,
                    mass_reduction=self.mass_reduction,
                )
                metric_term = self._metric_loss(flat_latents, flat_assignments, flat_distances)
        else:
            # Plain VAE, or the NVC warm-up before the anchors are initialised.
            kl_term = kl_divergence(flat_mean, flat_logvar)

        loss = self.kl_weight * kl_term + self.nebula_weight * nebula_term + self.metric_weight * metric_term
        return NebulaOutput(
            latents=latents,
            mean=mean,
            logvar=logvar,
            assignments=assignments,
            anchor_distances=anchor_distances,
            loss=loss,
            kl_loss=kl_term,
            nebula_loss=nebula_term,
            metric_loss=metric_term,
        )

    def _assign_to_anchors(
        self, mean: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.LongTensor | None, torch.FloatTensor | None]:
        """Return the nearest anchor of every mean (`-1` where `valid` is false) and the squared distances to all
        anchors, or `(None, None)` without anchors."""
        if not self.has_anchors:
            return None, None
        anchor_distances = squared_distances(mean.reshape(-1, self.latent_size).float(), self.anchors.float())
        anchor_distances = anchor_distances.reshape(*mean.shape[:-1], self.num_anchors)
        assignments = anchor_distances.argmin(-1)
        if valid is not None:
            assignments = assignments.masked_fill(~valid, -1)
        return assignments, anchor_distances

    def _metric_loss(self, latents: torch.Tensor, labels: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        if latents.shape[0] > self.metric_max_samples:
            subset = torch.randperm(latents.shape[0], device=latents.device)[: self.metric_max_samples]
            latents, labels, distances = latents[subset], labels[subset], distances[subset]
        if self.metric_loss_type == "triplet":
            return triplet_loss(latents, labels, self.metric_margin)

        # The ratio form also pulls every latent to its anchor, as the authors' released code does.
        offset = torch.sigmoid(self.ratio_offset_logit).float()
        pull = distances.gather(1, labels.unsqueeze(1)).mean()
        return ratio_loss(latents, labels, offset) + pull

    # ----------------------------------------------------------------------------------------------------------
    # Anchor initialisation and health. None of this takes part in autograd.
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_batch(self, means: torch.Tensor, assignments: torch.Tensor) -> None:
        counts = torch.bincount(assignments, minlength=self.num_anchors).float()
        self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
        self._pending_batch_size += means.shape[0]
        self._last_means = means
        if not self.nvc_active:
            self._warmup_means.append(means)
            kept = sum(chunk.shape[0] for chunk in self._warmup_means)
            while self._warmup_means and kept - self._warmup_means[0].shape[0] >= KMEANS_SAMPLE_SIZE:
                kept -= self._warmup_means.pop(0).shape[0]

    @torch.no_grad()
    def update_anchors(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Advance the anchor schedule by one optimizer step; call it after every `optimizer.step()`.

        During the first `anchor_warmup_steps` steps the bottleneck trains as a plain VAE while it keeps recent
        means. At the end of the warm-up the anchors are set by k-means on those means, `nebula_radius="auto"`
        is resolved, and the optimizer state of the anchors is reset. After that, anchors whose usage average
        falls below `DEAD_ANCHOR_THRESHOLD` latents per batch are moved onto distinct means of the last batch,
        and their optimizer moments are zeroed.

        With `torch.distributed` initialised, counts are summed across processes and rank 0's choices are
        broadcast, so every process ends up with the same anchors. Returns anchor statistics for logging (empty for a
        bottleneck without anchors).
        """
        if not self.has_anchors:
            return {}
        self.num_updates += 1
        counts, batch_size = self._collect_counts()

        if not bool(self.anchors_initialized):
            # k-means needs at least one latent per anchor, so with small batches the warm-up lasts until enough
            # means have been kept.
            kept = sum(chunk.shape[0] for chunk in self._warmup_means)
            if int(self.num_updates) >= self.anchor_warmup_steps and kept >= self.num_anchors:
                self.initialize_anchors(torch.cat(self._warmup_means), optimizer)
            return self.anchor_statistics(counts)

        if self._frozen_anchors is not None:
            self.anchors.data.copy_(self._frozen_anchors)
            return self.anchor_statistics(counts)

        if batch_size > 0:
            if self.anchor_usage.sum() == 0:
                # First step after initialisation: start at an even share, so no anchor counts as dead at once.
                self.anchor_usage.fill_(batch_size / self.num_anchors)
            self.anchor_usage.lerp_(counts, 1 - USAGE_EMA_DECAY)
            self._reseed_dead_anchors(optimizer, batch_size)
        return self.anchor_statistics(counts)

    def _collect_counts(self) -> tuple[torch.Tensor, int]:
        device = self.anchors.device
        counts = self._pending_counts if self._pending_counts is not None else torch.zeros(self.num_anchors)
        counts = counts.to(device=device, dtype=torch.float32)
        batch_size = self._pending_batch_size
        self._pending_counts = None
        self._pending_batch_size = 0
        if not _distributed():
            return counts, batch_size
        totals = torch.cat([counts, torch.tensor([float(batch_size)], device=device)])
        dist.all_reduce(totals)
        return totals[:-1], int(totals[-1].item())

    @torch.no_grad()
    def initialize_anchors(self, means: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set the anchors by k-means on `means` `(n, latent_size)` and switch the NVC losses on."""
        if means.shape[0] < self.num_anchors:
            raise ValueError(
                f"Cannot initialise {self.num_anchors} anchors from {means.shape[0]} latents; train with a larger "
                "batch or more warm-up steps, or lower num_anchors."
            )
        generator = torch.Generator(device=means.device).manual_seed(int(self.num_updates))
        centroids = kmeans(means.float(), self.num_anchors, KMEANS_ITERATIONS, generator)
        self.anchors.data.copy_(centroids.to(self.anchors.dtype))
        if _distributed():
            dist.broadcast(self.anchors.data, src=0)

        if self.nebula_radius == "auto":
            distances = pairwise_anchor_distances(self.anchors.float()).sqrt()
            upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
            self.radius.fill_(AUTO_RADIUS_FRACTION * distances[upper].median().item())
        self.anchors_initialized.fill_(True)
        self.anchor_usage.zero_()
        self._warmup_means = []
        if self.freeze_anchors_after_init:
            self._frozen_anchors = self.anchors.detach().clone()
        _reset_optimizer_rows(optimizer, self.anchors, torch.arange(self.num_anchors, device=self.anchors.device))

    def _reseed_dead_anchors(self, optimizer: torch.optim.Optimizer | None, batch_size: int) -> None:
        dead = torch.nonzero(self.anchor_usage < DEAD_ANCHOR_THRESHOLD).squeeze(1)
        if dead.numel() == 0:
            return
        candidates = self._last_means
        if candidates is None or candidates.shape[0] == 0:
            return
        dead = dead[: candidates.shape[0]]
        chosen = torch.randperm(candidates.shape[0], device=candidates.device)[: dead.numel()]
        new_anchors = self.anchors.data.clone()
        new_anchors[dead] = candidates[chosen].to(new_anchors.device, new_anchors.dtype)
        if _distributed():
            dist.broadcast(new_anchors, src=0)
        self.anchors.data.copy_(new_anchors)
        # A reseeded anchor restarts at the even share, as at initialisation, so it is not declared dead again at once.
        self.anchor_usage[dead] = batch_size / self.num_anchors
        self.num_reseeded += dead.numel()
        _reset_optimizer_rows(optimizer, self.anchors, dead)

    @torch.no_grad()
    def anchor_statistics(self, counts: torch.Tensor | None = None) -> dict[str, float]:
        """Anchor health for logging: anchors in use (at least 1% of the counted latents), the largest anchor's
        share, and the number of reseeded anchors so far. `counts` are per-anchor assignment counts."""
        if not self.has_anchors:
            return {}
        statistics = {"anchors_reseeded": float(self.num_reseeded), "anchors_initialized": float(self.nvc_active)}
        if counts is not None and counts.sum() > 0:
            shares = counts / counts.sum()
            statistics["anchors_in_use"] = float((shares >= 0.01).sum())
            statistics["largest_anchor_share"] = float(shares.max())
        return statistics


def _reset_optimizer_rows(
    optimizer: torch.optim.Optimizer | None, parameter: nn.Parameter, rows: torch.Tensor
) -> None:
    """Zero the optimizer's per-element state (e.g. Adam's moments) of `parameter` at the given rows."""
    if optimizer is None:
        return
    state = optimizer.state.get(parameter, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value[rows] = 0


def assignment_counts(assignments: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Count how many unpadded positions (`assignments >= 0`) each anchor receives."""
    flat = assignments.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_anchors)


__all__ = [
    "NVCBottleneck",
    "ShapeCheckedLoadingMixin",
    "NebulaOutput",
    "kl_divergence",
    "nebula_loss",
    "triplet_loss",
    "ratio_loss",
    "kmeans",
]
