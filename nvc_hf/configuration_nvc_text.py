"""Configuration of the NVC translation models."""

from __future__ import annotations

from .configuration_nvc import NVCConfig, check_choice, check_non_negative_float, check_positive_int


BOTTLENECK_LEVELS = ("token", "sentence")
ACTIVATIONS = ("relu", "gelu")


class NVCTextConfig(NVCConfig):
    r"""
    Configuration of [`NVCTextModel`] and [`NVCForConditionalGeneration`]: a pre-norm Transformer encoder-decoder
    whose encoder states pass through the NVC bottleneck (fields of [`NVCConfig`]) before the decoder's
    cross-attention. The defaults describe the Multi30k German-English model of this package (7.6M
    parameters with an 8k vocabulary).

    Args:
        vocab_size (`int`, *optional*, defaults to 8000):
            Size of the joint source/target vocabulary.
        d_model (`int`, *optional*, defaults to 256):
            Width of the encoder and decoder layers.
        encoder_layers, decoder_layers (`int`, *optional*, default to 3):
            Number of encoder and decoder layers.
        attention_heads (`int`, *optional*, defaults to 4):
            Attention heads in every attention layer; must divide `d_model`.
        ffn_dim (`int`, *optional*, defaults to 1024):
            Hidden size of the feed-forward blocks.
        activation_function (`str`, *optional*, defaults to `"relu"`):
            `"relu"` or `"gelu"`.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings, attention outputs and feed-forward outputs.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 256):
            Longest source or target sequence in tokens (sinusoidal positions).
        scale_embedding (`bool`, *optional*, defaults to `True`):
            Multiply token embeddings by `sqrt(d_model)`.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the output projection with the token embedding. The encoder and decoder always share one
            embedding matrix (the vocabulary is joint).
        bottleneck_level (`str`, *optional*, defaults to `"sentence"`):
            `"sentence"`: the masked mean of the encoder states is mapped to one latent per sentence, which is
            projected back and added to every encoder state; the anchors cluster sentences, and the decoder still
            reads the token states. `"token"`: every unpadded encoder state is mapped to a latent, and the decoder
            attends only to the latents (projected back to `d_model`), so all source information passes the
            bottleneck and the anchors cluster subword contexts. The default is `"sentence"` because the token
            variant starved the decoder on Multi30k. The KL term costs about 2 nats for each latent dimension a
            token uses, so the encoder kept only 5 to 6 nats per token before the anchors were set. After 250
            steps the validation BLEU was 0.6, against 13.6 without NVC (details in docs/BENCHMARKS.md).
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the token cross-entropy.
        latent_size (`int`, *optional*, defaults to 256):
            Latent size; with `bottleneck_level="token"` it limits what each source position can carry, so it
            defaults to `d_model`.
        kl_weight, nebula_weight, metric_weight (`float`, *optional*, default to 0.001):
            Weights of the NVC terms. The KL and metric terms are sums over the 256 latent dimensions: on Multi30k,
            once the anchors were set, the anchor KL was 50 to 85 nats and the triplet loss 45 to 80 per sentence,
            next to a token cross-entropy of 2.5 to 5. With weight 0.01 (the image head's default, for 32 latent
            dimensions) the sampled sentence latent carried mostly noise into every encoder state, and the
            validation BLEU after 250 steps was 1.4 against 8.9 without NVC; with 0.001 it was 12.3.
        metric_max_samples (`int`, *optional*, defaults to 512):
            Token latents compared by the metric loss per batch; its cost is quadratic in this number.
        pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id (`int`, *optional*):
            Special token ids, 0, 1, 2 and 1 as written by `train_joint_tokenizer`.

    Example:

    ```python
    >>> from nvc_hf import NVCTextConfig, NVCForConditionalGeneration
    >>> config = NVCTextConfig(vocab_size=8000, bottleneck_level="sentence")
    >>> model = NVCForConditionalGeneration(config)
    ```
    """

    model_type = "nvc-text"
    # `num_hidden_layers` sizes the decoder cache during generation.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "attention_heads",
        "num_hidden_layers": "decoder_layers",
    }

    vocab_size: int = 8000
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    attention_heads: int = 4
    ffn_dim: int = 1024
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    max_position_embeddings: int = 256
    scale_embedding: bool = True
    tie_word_embeddings: bool = True
    bottleneck_level: str = "sentence"
    label_smoothing: float = 0.0
    latent_size: int = 256
    kl_weight: float = 0.001
    nebula_weight: float = 0.001
    metric_weight: float = 0.001
    metric_max_samples: int = 512
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("max_position_embeddings", self.max_position_embeddings, minimum=2)
        if self.d_model % self.attention_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by attention_heads={self.attention_heads}; choose a head "
                "count that divides d_model."
            )
        for name in ("scale_embedding", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_choice("activation_function", self.activation_function, ACTIVATIONS)
        check_choice("bottleneck_level", self.bottleneck_level, BOTTLENECK_LEVELS)
        for name in ("dropout", "attention_dropout", "label_smoothing"):
            check_non_negative_float(name, getattr(self, name))
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            check_positive_int(name, value, minimum=0)
            if value >= self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (vocab_size={self.vocab_size}).")
        super().__post_init__(**kwargs)

    def nvc_settings(self) -> dict:
        """Return the bottleneck settings, with where the bottleneck sits (`bottleneck_level`), as a plain dict."""
        return {**super().nvc_settings(), "bottleneck_level": self.bottleneck_level}


__all__ = ["NVCTextConfig"]
