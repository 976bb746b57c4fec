"""The "translation" pipeline for NVC translation models.

transformers 5.x removed its own "translation" task, so a saved NVC translation folder declares this class in
`custom_pipelines` and `pipeline("translation", model=folder)` builds it. This file is part of the Hub remote code:
it imports only transformers.
"""

from __future__ import annotations

from transformers import Pipeline


class NVCTranslationPipeline(Pipeline):
    """Translate text with a sequence-to-sequence model's `generate`; returns `{"translation_text": ...}` per input.

    Generation options (`num_beams`, `max_new_tokens`, `do_sample`, ...) can be passed when the pipeline is built or
    called; the model's generation_config supplies the rest.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, inputs: str | list[str], **kwargs):
        """Translate one string (returns a one-element list) or a list of strings (returns one dict per string)."""
        outputs = super().__call__(inputs, **kwargs)
        return [outputs] if isinstance(inputs, str) else outputs

    def _sanitize_parameters(self, truncation=None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        return preprocess_params, generate_kwargs, {}

    def preprocess(self, text: str, truncation: bool = True):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"The translation pipeline expects a non-empty string, got {text!r}.")
        return self.tokenizer(
            text, return_tensors="pt", truncation=truncation, max_length=self.model.config.max_position_embeddings
        )

    def _forward(self, model_inputs, **generate_kwargs):
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        text = self.tokenizer.decode(model_outputs["output_ids"][0], skip_special_tokens=True)
        return {"translation_text": text}


__all__ = ["NVCTranslationPipeline"]
