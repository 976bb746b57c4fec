"""Bottleneck settings shared by every NVC configuration (vision, text, point clouds)."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.utils import logging

from .nebula import (
    BOTTLENECK_TYPES,
    KL_PRIORS,
    MASS_REDUCTIONS,
    METRIC_LOSSES,
    NEBULA_DISTANCES,
    check_choice,
    check_non_negative_float,
    check_positive_int,
)


logger = logging.get_logger(__name__)

# Fields of NVCConfig that describe the bottleneck; model cards list them.
NVC_FIELDS = (
    "bottleneck_type",
    "latent_size",
    "num_anchors",
    "kl_prior",
    "metric_loss",
    "nebula_distance",
    "nebula_radius",
    "nebula_eps",
    "mass_reduction",
    "metric_margin",
    "kl_weight",
    "nebula_weight",
    "metric_weight",
    "anchor_warmup_steps",
    "metric_max_samples",
)


class NVCConfig(PreTrainedConfig):
    r"""
    Base configuration holding the NVC bottleneck settings; the modality configs ([`NVCVisionConfig`], ...) add
    their network fields. The defaults follow the authors' MNIST reference (latent size 32, 30 anchors, all loss
    weights 1).

    Args:
        bottleneck_type (`str`, *optional*, defaults to `"nvc"`):
            `"nvc"` for the NVC bottleneck, `"vae"` for a plain variational bottleneck (standard normal prior, no
            anchors), `"none"` for a deterministic linear bottleneck: the same network without NVC, the ablation
            baseline.
        latent_size (`int`, *optional*, defaults to 32):
            Size of the latent space.
        num_anchors (`int`, *optional*, defaults to 30):
            Number of nebula anchors (at least 2).
        kl_prior (`str`, *optional*, defaults to `"anchor"`):
            `"anchor"`: the latents of anchor `i` follow `N(a_i, I)`; `"standard"`: `N(0, I)`.
        metric_loss (`str`, *optional*, defaults to `"triplet"`):
            `"triplet"` (batch-hard, margin `metric_margin`) or `"ratio"` (margin-free ratio with a learned offset
            plus a pull to the nearest anchor, as in the authors' released code).
        nebula_distance (`str`, *optional*, defaults to `"softplus"`):
            Inverse anchor distance: `"softplus"` `log(1 + r^2/d^2)`, `"clamp"` `max(0, -log(d^2/r^2))`, or `"raw"`
            `-log d^2` (the literal formula, unbounded below).
        nebula_radius (`float` or `"auto"`, *optional*, defaults to `"auto"`):
            Separation radius `r`; `"auto"` sets it to 0.05 times the median anchor distance at initialisation.
        nebula_eps (`float`, *optional*, defaults to 1e-6):
            Added to squared anchor distances so coincident anchors give a finite loss.
        mass_reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` divides anchor masses by the number of latents in the batch; `"sum"` is the paper's formula.
        metric_margin (`float`, *optional*, defaults to 1.0):
            Triplet margin.
        kl_weight, nebula_weight, metric_weight (`float`, *optional*, default to 1.0):
            Weights of the KL, nebula and metric terms.
        anchor_warmup_steps (`int`, *optional*, defaults to 0):
            Optimizer steps trained as a plain VAE before the anchors are set by k-means on recent latent means.
        metric_max_samples (`int`, *optional*, defaults to 1024):
            Largest number of latents per batch that the metric loss compares (its cost is quadratic).
    """

    bottleneck_type: str = "nvc"
    latent_size: int = 32
    num_anchors: int = 30
    kl_prior: str = "anchor"
    metric_loss: str = "triplet"
    nebula_distance: str = "softplus"
    nebula_radius: float | str = "auto"
    nebula_eps: float = 1e-6
    mass_reduction: str = "mean"
    metric_margin: float = 1.0
    kl_weight: float = 1.0
    nebula_weight: float = 1.0
    metric_weight: float = 1.0
    anchor_warmup_steps: int = 0
    metric_max_samples: int = 1024

    def __post_init__(self, **kwargs):
        self.validate_nvc_fields()
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers only logs a warning for a config of another model type, and `from_pretrained` would then
        # build this model with freshly initialised weights in place of every checkpoint tensor.
        model_type = config_dict.get("model_type")
        if cls.model_type and model_type and model_type != cls.model_type:
            raise ValueError(
                f"The config has model_type={model_type!r} but {cls.__name__} expects {cls.model_type!r}; load it "
                "with the matching class or with AutoConfig / AutoModel."
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_nvc_fields(self) -> None:
        """Raise `ValueError` naming the field, the value and what is allowed for any invalid bottleneck setting."""
        check_choice("bottleneck_type", self.bottleneck_type, BOTTLENECK_TYPES)
        check_positive_int("latent_size", self.latent_size)
        check_positive_int("num_anchors", self.num_anchors, minimum=2)
        check_choice("kl_prior", self.kl_prior, KL_PRIORS)
        check_choice("metric_loss", self.metric_loss, METRIC_LOSSES)
        check_choice("nebula_distance", self.nebula_distance, NEBULA_DISTANCES)
        if self.nebula_radius != "auto":
            check_non_negative_float(
                "nebula_radius (or the string 'auto')", self.nebula_radius, strictly_positive=True
            )
        check_non_negative_float("nebula_eps", self.nebula_eps, strictly_positive=True)
        check_choice("mass_reduction", self.mass_reduction, MASS_REDUCTIONS)
        check_non_negative_float("metric_margin", self.metric_margin)
        for name in ("kl_weight", "nebula_weight", "metric_weight"):
            check_non_negative_float(name, getattr(self, name))
        check_positive_int("anchor_warmup_steps", self.anchor_warmup_steps, minimum=0)
        check_positive_int("metric_max_samples", self.metric_max_samples, minimum=2)

        # Any number of anchors fits in a latent space of any size, so a large count is allowed. Clusters are
        # unit Gaussians, though, and far more anchors than latent dimensions crowd them together.
        if self.bottleneck_type == "nvc" and self.num_anchors > 100 * self.latent_size:
            logger.warning(
                f"num_anchors={self.num_anchors} is more than 100 times latent_size={self.latent_size}; "
                "the anchors will crowd each other and many may be reseeded. Consider a larger latent_size."
            )

    def nvc_settings(self) -> dict:
        """Return the bottleneck settings as a plain dict (for model cards and logs)."""
        return {name: getattr(self, name) for name in NVC_FIELDS}


__all__ = ["NVCConfig"]
