"""NVC translation model: forward pass, bottleneck placement, generation, cache, tying, save/load and Auto classes."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from text_helpers import (
    GERMAN_SENTENCE,
    multi30k_pairs,
    single_threaded_torch,  # noqa: F401 (autouse fixture)
    tiny_config,
    tiny_tokenizer,
    trained_text_folder,
)
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from nvc_hf import NVCForConditionalGeneration, NVCTextConfig, NVCTextModel


def real_batch(count: int = 8):
    sources, targets = multi30k_pairs("train", count)
    return tiny_tokenizer()(sources, text_target=targets, padding=True, return_tensors="pt")


def labels_from(batch) -> torch.Tensor:
    return batch["labels"].masked_fill(batch["labels"] == tiny_tokenizer().pad_token_id, -100)


def test_forward_loss_terms_on_real_batch():
    torch.manual_seed(0)
    model = NVCForConditionalGeneration(tiny_config(anchor_warmup_steps=0))
    model.bottleneck.initialize_anchors(torch.randn(64, 32))
    batch = real_batch()
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels_from(batch))

    assert outputs.logits.shape == (*batch["labels"].shape, len(tiny_tokenizer()))
    assert torch.allclose(outputs.loss, outputs.token_loss + outputs.nvc_loss)
    assert outputs.kl_loss > 0
    assert outputs.nebula_loss > 0
    assert outputs.metric_loss >= 0
    outputs.loss.backward()
    assert model.bottleneck.anchors.grad is not None


def test_token_bottleneck_masks_padding():
    torch.manual_seed(0)
    model = NVCTextModel(tiny_config(bottleneck_level="token")).eval()
    batch = real_batch()
    decoder_input_ids = torch.ones_like(batch["labels"][:, :3])
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids
    )

    padding = batch["attention_mask"] == 0
    assert padding.any(), "the batch must contain padding for this test"
    assert outputs.assignments.shape == batch["input_ids"].shape
    assert (outputs.assignments[padding] == -1).all()
    assert (outputs.assignments[~padding] >= 0).all()
    assert outputs.latents.shape == (*batch["input_ids"].shape, 32)


def test_padding_does_not_change_translation_memory():
    torch.manual_seed(0)
    model = NVCTextModel(tiny_config()).eval()
    tokenizer = tiny_tokenizer()
    alone = tokenizer([GERMAN_SENTENCE], return_tensors="pt")
    padded = tokenizer(
        [GERMAN_SENTENCE, GERMAN_SENTENCE + " Und noch viel mehr Text hier."], padding=True, return_tensors="pt"
    )
    memory_alone = model.encoder(**alone).last_hidden_state[0]
    memory_padded = model.encoder(**padded).last_hidden_state[0, : memory_alone.shape[0]]
    assert torch.allclose(memory_alone, memory_padded, atol=1e-5)


def test_sentence_bottleneck_one_latent_per_sentence():
    torch.manual_seed(0)
    model = NVCTextModel(tiny_config(bottleneck_level="sentence")).eval()
    batch = real_batch()
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=torch.ones_like(batch["labels"][:, :2]),
    )
    assert outputs.latents.shape == (batch["input_ids"].shape[0], 32)
    assert outputs.assignments.shape == (batch["input_ids"].shape[0],)


@pytest.mark.parametrize("bottleneck_type", ["nvc", "vae", "none"])
def test_bottleneck_types_train(bottleneck_type):
    torch.manual_seed(0)
    model = NVCForConditionalGeneration(tiny_config(bottleneck_type=bottleneck_type))
    batch = real_batch()
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels_from(batch))
    assert torch.isfinite(outputs.loss)
    if bottleneck_type == "none":
        assert outputs.loss == outputs.token_loss


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="bottleneck_level"):
        NVCTextConfig(bottleneck_level="word")
    with pytest.raises(ValueError, match="not divisible by attention_heads"):
        NVCTextConfig(d_model=30, attention_heads=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        NVCTextConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="eos_token_id=9 is outside the vocabulary"):
        NVCTextConfig(vocab_size=5, eos_token_id=9)


def test_forward_rejects_bad_inputs():
    model = NVCForConditionalGeneration(tiny_config())
    vocabulary = len(tiny_tokenizer())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[vocabulary + 5, 2]]), labels=torch.tensor([[4, 2]]))
    with pytest.raises(ValueError, match="2-D tensor"):
        model(input_ids=torch.tensor([4, 2]), labels=torch.tensor([[4, 2]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=torch.tensor([[4, 2]]), attention_mask=torch.ones(1, 3), labels=torch.tensor([[4, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.full((1, 300), 4), labels=torch.tensor([[4, 2]]))
    with pytest.raises(ValueError, match="decoder_input_ids, or labels"):
        model(input_ids=torch.tensor([[4, 2]]))


def trained_model_and_batch():
    folder = trained_text_folder()
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sources, _ = multi30k_pairs("validation", 6)
    return model, tokenizer, tokenizer(sources, padding=True, return_tensors="pt")


@pytest.mark.parametrize("num_beams", [1, 5])
def test_cached_and_uncached_decoding_match(num_beams):
    model, _, batch = trained_model_and_batch()
    cached = model.generate(**batch, num_beams=num_beams, max_new_tokens=20, use_cache=True)
    uncached = model.generate(**batch, num_beams=num_beams, max_new_tokens=20, use_cache=False)
    assert torch.equal(cached, uncached)
    # The translations vary along the sequence, so decoding without the cached history would change them.
    assert len(set(cached[:, 1:].flatten().tolist())) > 3


def test_cached_decoding_feeds_one_token_per_step():
    model, _, batch = trained_model_and_batch()
    lengths = []
    hook = model.model.decoder.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        model.generate(**batch, num_beams=1, max_new_tokens=8, min_new_tokens=8, use_cache=True)
    finally:
        hook.remove()
    assert lengths == [1] * 8


@pytest.mark.parametrize("num_beams", [1, 5])
def test_generate_runs_encoder_and_bottleneck_once(num_beams):
    model, _, batch = trained_model_and_batch()
    calls = []
    hooks = [
        model.get_encoder().register_forward_hook(lambda *args: calls.append("encoder")),
        model.bottleneck.register_forward_hook(lambda *args: calls.append("bottleneck")),
    ]
    try:
        model.generate(**batch, num_beams=num_beams, max_new_tokens=8, min_new_tokens=8)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["bottleneck", "encoder"]


def test_beam_search_matches_full_cache_reorder(monkeypatch):
    model, _, batch = trained_model_and_batch()
    kept_in_place = model.generate(**batch, num_beams=5, max_new_tokens=20)

    def reorder_both_caches(cache, beam_idx):
        # What transformers does for a model without `_reorder_cache`: reorder self- and cross-attention caches.
        cache.reorder_cache(beam_idx)
        return cache

    monkeypatch.setattr(model, "_reorder_cache", reorder_both_caches)
    fully_reordered = model.generate(**batch, num_beams=5, max_new_tokens=20)
    assert torch.equal(kept_in_place, fully_reordered)


def test_encoder_without_loss_keeps_outputs():
    torch.manual_seed(0)
    model = NVCTextModel(tiny_config(anchor_warmup_steps=0, bottleneck_level="token")).eval()
    model.bottleneck.initialize_anchors(torch.randn(64, 32))
    # More unpadded tokens than metric_max_samples, so the metric loss draws a random subset.
    batch = real_batch(60)
    assert int(batch["attention_mask"].sum()) > model.config.metric_max_samples

    state = torch.get_rng_state()
    with_loss = model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"], return_loss=True)
    assert not torch.equal(state, torch.get_rng_state())
    state = torch.get_rng_state()
    without_loss = model.encoder(batch["input_ids"], attention_mask=batch["attention_mask"], return_loss=False)
    assert torch.equal(state, torch.get_rng_state())

    for name in ("last_hidden_state", "encoder_states", "latents", "mean", "logvar", "assignments"):
        assert torch.equal(getattr(with_loss, name), getattr(without_loss, name)), name
    assert with_loss.nvc_loss is not None
    for name in ("nvc_loss", "kl_loss", "nebula_loss", "metric_loss"):
        assert getattr(without_loss, name) is None, name


def test_generate_length_options_log_no_warning():
    model, _, batch = trained_model_and_batch()
    assert model.generation_config.max_length == 128
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    generation_logger = logging.getLogger("transformers.generation.utils")
    generation_logger.addHandler(handler)
    try:
        by_new_tokens = model.generate(**batch, num_beams=1, max_new_tokens=5, min_new_tokens=5)
        by_max_length = model.generate(**batch, num_beams=1, max_length=4, min_length=4)
    finally:
        generation_logger.removeHandler(handler)

    assert [record.getMessage() for record in records] == []
    # Each sequence starts with the decoder start token.
    assert by_new_tokens.shape[1] == 6
    assert by_max_length.shape[1] == 4


def test_generate_modes_and_defaults():
    model, tokenizer, batch = trained_model_and_batch()
    assert model.generation_config.num_beams == 5
    assert model.generation_config.forced_eos_token_id is None
    assert model.generation_config.decoder_start_token_id == tokenizer.bos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    beam = model.generate(**batch)
    assert (beam[:, 0] == tokenizer.bos_token_id).all()
    short = model.generate(**batch, num_beams=1, max_new_tokens=3)
    assert short.shape[1] <= 4
    torch.manual_seed(0)
    sampled = model.generate(**batch, do_sample=True, top_k=20, max_new_tokens=20)
    assert sampled.shape[0] == batch["input_ids"].shape[0]
    texts = tokenizer.batch_decode(beam, skip_special_tokens=True)
    assert all(text and "<" not in text and "▁" not in text for text in texts)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_keeps_every_matrix(tmp_path, tie):
    torch.manual_seed(0)
    model = NVCForConditionalGeneration(tiny_config(tie_word_embeddings=tie, anchor_warmup_steps=0))
    model.bottleneck.initialize_anchors(torch.randn(64, 32))
    assert (model.lm_head.weight is model.model.encoder.embed_tokens.weight) == tie
    model.save_pretrained(tmp_path)

    loaded = NVCForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name
    assert (loaded.lm_head.weight is loaded.model.encoder.embed_tokens.weight) == tie
    if not tie:
        assert not torch.equal(loaded.lm_head.weight, loaded.model.encoder.embed_tokens.weight)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 1
    assert generation["eos_token_id"] == 2
    assert generation.get("forced_eos_token_id") is None


def test_auto_classes(tmp_path):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("nvc-text"), NVCTextConfig)
    assert isinstance(AutoModel.from_config(config), NVCTextModel)
    assert isinstance(AutoModelForSeq2SeqLM.from_config(config), NVCForConditionalGeneration)


def test_pipeline_translates_german_sentence():
    folder = trained_text_folder()
    assert (folder / "pipeline_nvc_text.py").exists()
    translator = pipeline("translation", model=str(folder), trust_remote_code=True, num_beams=5)
    text = translator(GERMAN_SENTENCE)[0]["translation_text"]

    model, tokenizer, _ = trained_model_and_batch()
    expected = tokenizer.batch_decode(
        model.generate(**tokenizer([GERMAN_SENTENCE], return_tensors="pt"), num_beams=5), skip_special_tokens=True
    )[0]
    assert text == expected
    assert text.strip()


REMOTE_CODE_SCRIPT = """
import sys
# The package may be installed in this environment; blocking the import proves the folder's own code is used.
sys.modules["nvc_hf"] = None
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
folder = sys.argv[1]
model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer([sys.argv[2]], return_tensors="pt")
print(type(model).__module__)
print(tokenizer.decode(model.generate(**batch, num_beams=5)[0], skip_special_tokens=True))
translator = pipeline("translation", model=folder, trust_remote_code=True, dtype=torch.float32)
print(translator(sys.argv[2], num_beams=5)[0]["translation_text"])
"""


def test_remote_code_loads_without_package(tmp_path):
    folder = trained_text_folder()
    for name in ("configuration_nvc_text.py", "modeling_nvc_text.py", "nebula.py", "configuration_nvc.py"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_nvc_text.NVCForConditionalGeneration"

    model, tokenizer, _ = trained_model_and_batch()
    expected = tokenizer.decode(
        model.generate(**tokenizer([GERMAN_SENTENCE], return_tensors="pt"), num_beams=5)[0], skip_special_tokens=True
    )
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    environment = {
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(folder), GERMAN_SENTENCE],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    module, translation, piped = result.stdout.strip().splitlines()[-3:]
    assert module.startswith("transformers_modules")
    assert translation == expected
    assert piped == expected
