"""A joint source/target subword tokenizer trained with the `tokenizers` library.

Spaces become the marker `▁` at the start of a word and punctuation is split off, so decoding restores the
original spacing exactly: hypotheses come out detokenised, ready for sacreBLEU.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
# The ids 0-3 are fixed, because the model config and generation_config refer to them.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]


def train_joint_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, model_max_length: int = 256, algorithm: str = "bpe"
) -> PreTrainedTokenizerFast:
    """Train one BPE or Unigram vocabulary on source and target sentences together.

    Args:
        texts: sentences of both languages (the training split only, so no test text shapes the vocabulary).
        vocab_size: size of the vocabulary, special tokens included.
        model_max_length: maximum input length in tokens that the tokenizer reports to callers.
        algorithm: `"bpe"` or `"unigram"`.

    Returns a `PreTrainedTokenizerFast` that appends `</s>` to every sequence (source and target) and has the
    special tokens `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3.
    """
    if algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    elif algorithm == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK_TOKEN, show_progress=False
        )
    else:
        raise ValueError(f"algorithm={algorithm!r} is not supported; use 'bpe' or 'unigram'.")

    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(texts, trainer=trainer)

    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


__all__ = ["SPECIAL_TOKENS", "train_joint_tokenizer"]
