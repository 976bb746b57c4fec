"""NVC translation models: a pre-norm Transformer encoder-decoder with the NVC bottleneck before cross-attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput

from .configuration_nvc_text import NVCTextConfig
from .nebula import NVCBottleneck, ShapeCheckedLoadingMixin


@dataclass
class NVCTextEncoderOutput(ModelOutput):
    """
    Output of [`NVCTextEncoder`]. Generation expands every tensor field along the batch, so the scalar loss terms
    are only filled when the encoder is called with `return_loss=True`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, source_length, d_model)`):
            Memory for the decoder's cross-attention: the bottleneck output projected back to `d_model`.
        encoder_states (`torch.FloatTensor` of shape `(batch, source_length, d_model)`):
            Transformer encoder states before the bottleneck.
        latents, mean, logvar (`torch.FloatTensor` of shape `(batch, source_length, latent_size)`, or
            `(batch, latent_size)` with `bottleneck_level="sentence"`):
            Bottleneck latents (sampled in training mode), posterior means and log-variances.
        assignments (`torch.LongTensor` of shape `(batch, source_length)` or `(batch,)`, *optional*):
            Nearest anchor of each latent, `-1` at padding (only with `bottleneck_type="nvc"`).
        nvc_loss, kl_loss, nebula_loss, metric_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted sum of the bottleneck terms, and each term unweighted.
    """

    last_hidden_state: torch.FloatTensor | None = None
    encoder_states: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    nvc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None


@dataclass
class NVCSeq2SeqModelOutput(ModelOutput):
    """
    Output of [`NVCTextModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, target_length, d_model)`):
            Final decoder states.
        cache (`EncoderDecoderCache`, *optional*):
            Decoder self- and cross-attention keys and values, returned when `use_cache=True`.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch, source_length, d_model)`):
            Memory the decoder attended to (after the bottleneck).
        latents, mean, logvar, assignments, nvc_loss, kl_loss, nebula_loss, metric_loss:
            As in [`NVCTextEncoderOutput`].
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    nvc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None


@dataclass
class NVCSeq2SeqLMOutput(ModelOutput):
    """
    Output of [`NVCForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Token cross-entropy (label-smoothed as configured) plus the weighted NVC terms; only with `labels`.
        logits (`torch.FloatTensor` of shape `(batch, target_length, vocab_size)`):
            Next-token scores before softmax.
        cache (`EncoderDecoderCache`, *optional*):
            Decoder keys and values for the next generation step.
        token_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The cross-entropy part of `loss`.
        encoder_last_hidden_state, latents, mean, logvar, assignments, nvc_loss, kl_loss, nebula_loss, metric_loss:
            As in [`NVCSeq2SeqModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    token_loss: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    logvar: torch.FloatTensor | None = None
    assignments: torch.LongTensor | None = None
    nvc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    nebula_loss: torch.FloatTensor | None = None
    metric_loss: torch.FloatTensor | None = None


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Return `(length, dim)` sinusoidal encodings (sines in the first half, cosines in the second) of `positions`."""
    half = dim // 2
    frequencies = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1))
    )
    angles = positions.float().unsqueeze(1) * frequencies.unsqueeze(0)
    encoding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2 == 1:
        encoding = F.pad(encoding, (0, 1))
    return encoding


class NVCSinusoidalPositions(nn.Module):
    """Sinusoidal encodings of positions `0 .. max_positions - 1`, built once per device on first use.

    The table contains exactly the values `sinusoidal_positions` returns for each position, so cached and
    uncached decoding add the same encodings. It is not saved with the weights.
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = max_positions
        self.dim = dim
        self._table: torch.Tensor | None = None

    def forward(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Return the `(length, dim)` encodings of positions `start .. start + length - 1`."""
        if self._table is None or self._table.device != device:
            self._table = sinusoidal_positions(torch.arange(self.max_positions, device=device), self.dim)
        return self._table[start : start + length]


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Build decoder inputs from `(batch, length)` labels: prepend the start token, drop the last label and
    replace the ignored label `-100` by padding."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class NVCAttention(nn.Module):
    """Multi-head attention with PyTorch's scaled dot-product kernel and an optional key/value cache.

    Self-attention layers store the keys and values of every decoded token; cross-attention layers compute the
    keys and values of the encoder memory once and reuse them at later steps.
    """

    def __init__(self, config: NVCTextConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.num_heads = config.attention_heads
        self.head_dim = config.d_model // config.attention_heads
        self.dropout = config.attention_dropout
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch, query_length, d_model)` queries (and keys/values for self-attention).
            key_value_states: `(batch, source_length, d_model)` encoder memory for cross-attention.
            attention_mask: boolean mask broadcastable to `(batch, heads, query_length, key_length)`, `True` where
                attention is allowed.
            is_causal: apply a causal mask aligned to the end of the keys (decoder self-attention).
            cache: an [`EncoderDecoderCache`] during cached decoding.
        """
        queries = self._split_heads(self.q_proj(hidden_states))

        if self.is_cross_attention:
            cross_cache = cache.cross_attention_cache if cache is not None else None
            if cache is not None and cache.is_updated.get(self.layer_idx):
                keys = cross_cache.layers[self.layer_idx].keys
                values = cross_cache.layers[self.layer_idx].values
            else:
                keys = self._split_heads(self.k_proj(key_value_states))
                values = self._split_heads(self.v_proj(key_value_states))
                if cache is not None:
                    keys, values = cross_cache.update(keys, values, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True
        else:
            keys = self._split_heads(self.k_proj(hidden_states))
            values = self._split_heads(self.v_proj(hidden_states))
            if cache is not None:
                keys, values = cache.self_attention_cache.update(keys, values, self.layer_idx)

        query_length, key_length = queries.shape[2], keys.shape[2]
        if is_causal and query_length > 1:
            # Query i sits at absolute position key_length - query_length + i and attends to keys up to that position.
            offset = key_length - query_length
            causal = torch.ones(query_length, key_length, dtype=torch.bool, device=queries.device).tril(offset)
            attention_mask = causal if attention_mask is None else attention_mask & causal

        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class NVCFeedForward(nn.Module):
    def __init__(self, config: NVCTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)
        self.use_relu = config.activation_function == "relu"
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        # Nothing else reads fc1's output, so ReLU overwrites it instead of allocating a second (tokens, ffn_dim)
        # tensor. Autograd allows this because the backward of a linear layer does not need its output.
        hidden_states = F.relu(hidden_states, inplace=True) if self.use_relu else F.gelu(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        return self.fc2(hidden_states)


class NVCEncoderLayer(nn.Module):
    """Pre-norm encoder layer: self-attention, then a feed-forward block, each in a residual branch."""

    def __init__(self, config: NVCTextConfig):
        super().__init__()
        self.self_attn = NVCAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.feed_forward = NVCFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask)
        hidden_states = hidden_states + F.dropout(attended, p=self.dropout, training=self.training)
        transformed = self.feed_forward(self.final_layer_norm(hidden_states))
        return hidden_states + F.dropout(transformed, p=self.dropout, training=self.training)


class NVCDecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention to the memory, then a feed-forward block."""

    def __init__(self, config: NVCTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NVCAttention(config, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = NVCAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.feed_forward = NVCFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.self_attn_layer_norm(hidden_states), is_causal=True, cache=cache)
        hidden_states = hidden_states + F.dropout(attended, p=self.dropout, training=self.training)
        attended = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=memory,
            attention_mask=memory_mask,
            cache=cache,
        )
        hidden_states = hidden_states + F.dropout(attended, p=self.dropout, training=self.training)
        transformed = self.feed_forward(self.final_layer_norm(hidden_states))
        return hidden_states + F.dropout(transformed, p=self.dropout, training=self.training)


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids the embedding cannot take."""
    if not torch.is_tensor(ids) or ids.dim() != 2:
        shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"{name} must be a 2-D tensor of shape (batch, length), got {shape}; use the tokenizer.")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(ids.shape)}); pass at least one sequence.")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty along the length; pass at least one token per sequence.")
    if ids.numel() > 0 and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name} contains ids from {int(ids.min())} to {int(ids.max())}, outside the vocabulary [0, {vocab_size}); "
            "use the tokenizer saved with this model."
        )


def memory_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a `(batch, source_length)` padding mask into a boolean `(batch, 1, 1, source_length)` attention mask."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class NVCTextPreTrainedModel(ShapeCheckedLoadingMixin, PreTrainedModel):
    config_class = NVCTextConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # The losses are token means, so Trainer must not rescale them by `num_items_in_batch`.
    accepts_loss_kwargs = False
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Every write goes through `transformers.initialization`, which skips tensors loaded from a checkpoint,
        # so anchors and tied matrices survive `from_pretrained` bit for bit.
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Standard deviation d_model^-1/2: scaled by sqrt(d_model) the embeddings have unit variance, and the
            # tied output projection starts with logits of unit scale.
            init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, NVCBottleneck):
            if module.anchors is not None:
                init.normal_(module.anchors)
            if module.ratio_offset_logit is not None:
                init.zeros_(module.ratio_offset_logit)


class NVCTextEncoder(NVCTextPreTrainedModel):
    """
    Token embedding (shared with the decoder), Transformer encoder layers and the NVC bottleneck. Its output is
    the memory the decoder attends to, so `generate` runs the bottleneck once per source batch.
    """

    def __init__(self, config: NVCTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.positions = NVCSinusoidalPositions(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([NVCEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.bottleneck = NVCBottleneck.from_config(config, input_size=config.d_model)
        self.latent_projection = nn.Linear(config.latent_size, config.d_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> NVCTextEncoderOutput:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_length)`):
                Source token ids.
            attention_mask (`torch.Tensor` of shape `(batch, source_length)`, *optional*):
                1 for tokens, 0 for padding.
            return_loss (`bool`, *optional*, defaults to `False`):
                Compute the scalar NVC loss fields. Generation leaves them out (see [`NVCTextEncoderOutput`]),
                which also skips their computation.
        """
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
                "pass the mask returned by the tokenizer."
            )
        if attention_mask is not None and ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must contain only 1 (token) and 0 (padding); pass the tokenizer's mask.")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"The source has {length} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate it with the tokenizer (truncation=True)."
            )

        positions = self.positions(0, length, input_ids.device)
        hidden_states = self.embed_tokens(input_ids) * self.embed_scale + positions.to(self.embed_tokens.weight.dtype)
        hidden_states = F.dropout(hidden_states, p=self.config.dropout, training=self.training)
        mask = memory_attention_mask(attention_mask)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        encoder_states = self.layer_norm(hidden_states)

        if self.config.bottleneck_level == "token":
            nebula = self.bottleneck(encoder_states, attention_mask, return_loss=return_loss)
            memory = self.latent_projection(nebula.latents)
        else:
            if attention_mask is None:
                pooled = encoder_states.mean(1)
            else:
                weights = attention_mask.to(encoder_states.dtype).unsqueeze(-1)
                pooled = (encoder_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            nebula = self.bottleneck(pooled, return_loss=return_loss)
            memory = encoder_states + self.latent_projection(nebula.latents).unsqueeze(1)

        return NVCTextEncoderOutput(
            last_hidden_state=memory,
            encoder_states=encoder_states,
            latents=nebula.latents,
            mean=nebula.mean,
            logvar=nebula.logvar,
            assignments=nebula.assignments,
            nvc_loss=nebula.loss,
            kl_loss=nebula.kl_loss,
            nebula_loss=nebula.nebula_loss,
            metric_loss=nebula.metric_loss,
        )


class NVCTextDecoder(nn.Module):
    """Causal Transformer decoder layers over embedded target tokens; the embedding lives in the encoder."""

    def __init__(self, config: NVCTextConfig):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.positions = NVCSinusoidalPositions(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([NVCDecoderLayer(config, index) for index in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        """Decode `(batch, new_length, d_model)` unscaled embeddings of the newest target tokens; return the
        `(batch, new_length, d_model)` final states. With a cache, positions continue after the cached tokens."""
        past_length = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if past_length + length > self.config.max_position_embeddings:
            raise ValueError(
                f"The target reached {past_length + length} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; lower max_new_tokens or max_length."
            )
        positions = self.positions(past_length, length, inputs_embeds.device)
        hidden_states = inputs_embeds * self.embed_scale + positions.to(inputs_embeds.dtype)
        hidden_states = F.dropout(hidden_states, p=self.config.dropout, training=self.training)
        for layer in self.layers:
            hidden_states = layer(hidden_states, memory, memory_mask, cache)
        return self.layer_norm(hidden_states)


class NVCTextModel(NVCTextPreTrainedModel):
    """
    The encoder-decoder without the output projection: source tokens -> encoder -> NVC bottleneck -> memory;
    target tokens -> decoder attending to the memory. Returns decoder states, latents, anchor assignments and the
    bottleneck's loss terms.
    """

    def __init__(self, config: NVCTextConfig):
        super().__init__(config)
        self.encoder = NVCTextEncoder(config)
        self.decoder = NVCTextDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> NVCTextEncoder:
        return self.encoder

    @property
    def bottleneck(self) -> NVCBottleneck:
        return self.encoder.bottleneck

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_outputs: NVCTextEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> NVCSeq2SeqModelOutput:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_length)`):
                Source token ids; may be left out when `encoder_outputs` is given.
            attention_mask (`torch.Tensor` of shape `(batch, source_length)`, *optional*):
                Source padding mask, 1 for tokens.
            decoder_input_ids (`torch.LongTensor` of shape `(batch, target_length)`):
                Target tokens shifted right (starting with `decoder_start_token_id`). With a filled `cache`, only
                the tokens not yet in the cache.
            encoder_outputs ([`NVCTextEncoderOutput`], *optional*):
                Precomputed memory, as `generate` passes it.
            cache (`EncoderDecoderCache`, *optional*):
                Keys and values of earlier decoding steps; updated in place and returned.
            use_cache (`bool`, *optional*):
                Create a cache when none is passed and return it.
        """
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (the source tokens) or encoder_outputs.")
            encoder_outputs = self.encoder(input_ids, attention_mask=attention_mask, return_loss=True)
        elif isinstance(encoder_outputs, tuple):
            encoder_outputs = NVCTextEncoderOutput(last_hidden_state=encoder_outputs[0])
        if decoder_input_ids is None:
            raise ValueError("Pass decoder_input_ids, or labels to NVCForConditionalGeneration.")
        check_token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size)

        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        inputs_embeds = self.encoder.embed_tokens(decoder_input_ids)
        hidden_states = self.decoder(
            inputs_embeds, encoder_outputs.last_hidden_state, memory_attention_mask(attention_mask), cache
        )
        return NVCSeq2SeqModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache or cache is not None else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            latents=encoder_outputs.latents,
            mean=encoder_outputs.mean,
            logvar=encoder_outputs.logvar,
            assignments=encoder_outputs.assignments,
            nvc_loss=encoder_outputs.nvc_loss,
            kl_loss=encoder_outputs.kl_loss,
            nebula_loss=encoder_outputs.nebula_loss,
            metric_loss=encoder_outputs.metric_loss,
        )


class NVCForConditionalGeneration(NVCTextPreTrainedModel, GenerationMixin):
    """
    [`NVCTextModel`] with an output projection to the vocabulary, tied to the shared token embedding when
    `tie_word_embeddings=True`. Trains with `labels` (token cross-entropy plus the weighted NVC terms) and
    translates with `generate` (greedy, beam search, sampling; decoder keys and values cached).

    Example:

    ```python
    >>> from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained("path/to/model")
    >>> model = AutoModelForSeq2SeqLM.from_pretrained("path/to/model")
    >>> batch = tokenizer(["Ein Hund rennt durch das Gras."], return_tensors="pt")
    >>> tokenizer.batch_decode(model.generate(**batch, num_beams=5), skip_special_tokens=True)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}

    def __init__(self, config: NVCTextConfig):
        super().__init__(config)
        self.model = NVCTextModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()
        self._set_generation_defaults()

    def _set_generation_defaults(self) -> None:
        # Special ids are set explicitly: left unset, `forced_eos_token_id` can default to the padding id 0 and
        # end every translation with padding. `from_pretrained` replaces these with generation_config.json.
        generation_config = self.generation_config
        generation_config.pad_token_id = self.config.pad_token_id
        generation_config.bos_token_id = self.config.bos_token_id
        generation_config.eos_token_id = self.config.eos_token_id
        generation_config.decoder_start_token_id = self.config.decoder_start_token_id
        generation_config.forced_eos_token_id = None
        generation_config.num_beams = 5
        generation_config.max_length = 128

    def _prepare_generated_length(self, generation_config: GenerationConfig, *args, **kwargs) -> GenerationConfig:
        # The saved `max_length` only caps calls that set no length. A call's `max_new_tokens` replaces it, so the
        # saved value counts as a default here and transformers does not warn that both lengths were set.
        # NOTE: this overrides a private `GenerationMixin` hook (transformers 5.25); if it is renamed, only the
        # warning returns.
        if (
            "has_default_max_length" in kwargs
            and generation_config.max_new_tokens is not None
            and generation_config.max_length == self.generation_config.max_length
        ):
            kwargs["has_default_max_length"] = True
        return super()._prepare_generated_length(generation_config, *args, **kwargs)

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Reorder the decoder self-attention cache after a beam-search step.

        `beam_idx` only moves rows among the beams of one source sentence. Those beams attend to the same encoder
        memory, so their cross-attention keys and values are equal and stay in place, which saves copying them at
        every step.
        """
        if isinstance(cache, EncoderDecoderCache):
            cache.self_attention_cache.reorder_cache(beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        return cache

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> NVCTextEncoder:
        return self.model.encoder

    @property
    def bottleneck(self) -> NVCBottleneck:
        return self.model.encoder.bottleneck

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_outputs: NVCTextEncoderOutput | tuple | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> NVCSeq2SeqLMOutput:
        """
        Args:
            input_ids, attention_mask, decoder_input_ids, encoder_outputs, cache, use_cache:
                As in [`NVCTextModel.forward`].
            labels (`torch.LongTensor` of shape `(batch, target_length)`, *optional*):
                Target token ids ending with `</s>`, `-100` at padding. Without `decoder_input_ids`, the decoder
                inputs are the labels shifted right.
        """
        if labels is not None:
            check_token_ids("labels", labels.masked_fill(labels == -100, 0), self.config.vocab_size)
            if (labels == -100).all():
                # The token cross-entropy would average over zero tokens and return NaN.
                raise ValueError(
                    "labels contain only -100 (padding), so every target sequence is empty; drop pairs with an "
                    "empty target from the data."
                )
            if decoder_input_ids is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            use_cache = False

        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            encoder_outputs=encoder_outputs,
            cache=cache,
            use_cache=use_cache,
        )
        logits = self.lm_head(outputs.last_hidden_state)

        loss = token_loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)} but decoder_input_ids has "
                    f"{tuple(decoder_input_ids.shape)}; pass labels of the same shape or leave decoder_input_ids out."
                )
            token_loss = F.cross_entropy(
                logits.float().flatten(0, 1),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
            loss = token_loss if outputs.nvc_loss is None else token_loss + outputs.nvc_loss

        return NVCSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            token_loss=token_loss,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            latents=outputs.latents,
            mean=outputs.mean,
            logvar=outputs.logvar,
            assignments=outputs.assignments,
            nvc_loss=outputs.nvc_loss,
            kl_loss=outputs.kl_loss,
            nebula_loss=outputs.nebula_loss,
            metric_loss=outputs.metric_loss,
        )


__all__ = ["NVCTextPreTrainedModel", "NVCTextEncoder", "NVCTextModel", "NVCForConditionalGeneration"]
