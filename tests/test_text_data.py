"""Parallel text readers, the joint subword tokenizer, token-count batching and sacreBLEU scoring."""

import gzip

import datasets
import pytest
from text_helpers import (
    MULTI30K_FOLDER,
    multi30k_pairs,
    single_threaded_torch,  # noqa: F401 (autouse fixture)
    tiny_tokenizer,
)
from transformers import AutoTokenizer

from nvc_hf.data.parallel_text import load_dataset_pairs, load_multi30k, read_lines, read_parallel_files


def test_multi30k_copy_has_all_splits():
    splits = load_multi30k(MULTI30K_FOLDER)
    assert {split: len(pairs[0]) for split, pairs in splits.items()} == {
        "train": 29000,
        "validation": 1014,
        "test": 1000,
    }
    assert splits["test"][0][0].startswith("Ein Mann mit einem orangefarbenen Hut")
    assert splits["test"][1][0].startswith("A man in an orange hat")
    assert (MULTI30K_FOLDER / "PROVENANCE.md").exists()


def test_unequal_line_counts_name_file_and_line(tmp_path):
    source, target = tmp_path / "train.de", tmp_path / "train.en"
    source.write_text("Ein Hund.\nZwei Hunde.\nDrei Hunde.\n", encoding="utf-8")
    target.write_text("A dog.\nTwo dogs.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.de has 3 lines but .*train\.en has 2.*line 3 of .*train\.de"):
        read_parallel_files(source, target)


def test_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.en"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.en is empty"):
        read_lines(empty)


def test_empty_line_names_line(tmp_path):
    path = tmp_path / "gaps.de"
    path.write_text("Ein Hund.\n\nZwei Hunde.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"gaps\.de, line 2: empty line"):
        read_lines(path)


def test_undecodable_bytes_name_line(tmp_path):
    path = tmp_path / "latin1.de.gz"
    with gzip.open(path, "wb") as handle:
        handle.write("Ein Hund.\nDer Bär läuft.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.de\.gz, line 2: invalid UTF-8"):
        read_lines(path)


def test_dataset_columns_are_read_and_checked():
    sources, targets = multi30k_pairs("train", 20)
    dataset = datasets.Dataset.from_dict({"de": sources, "en": targets})
    assert load_dataset_pairs(dataset, "de", "en") == (sources, targets)
    with pytest.raises(ValueError, match="Column 'source' not found"):
        load_dataset_pairs(dataset, "source", "en")
    broken = datasets.Dataset.from_dict({"de": ["Ein Hund.", ""], "en": ["A dog.", "Two dogs."]})
    with pytest.raises(ValueError, match="row 1, column 'de'"):
        load_dataset_pairs(broken, "de", "en")


def test_tokenizer_round_trip_on_real_text(tmp_path):
    tokenizer = tiny_tokenizer()
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    sources, targets = multi30k_pairs("test", 50)
    batch = loaded(sources, text_target=targets)
    assert all(ids[-1] == loaded.eos_token_id for ids in batch["input_ids"])
    assert all(ids[-1] == loaded.eos_token_id for ids in batch["labels"])
    # Decoding restores the original spacing around punctuation: detokenised text, ready for sacreBLEU.
    # Characters never seen in training (such as a capital umlaut in this small sample) become <unk> and are lost,
    # so only sentences without <unk> must come back unchanged.
    for ids, texts in ((batch["input_ids"], sources), (batch["labels"], targets)):
        known = [index for index, row in enumerate(ids) if loaded.unk_token_id not in row]
        assert len(known) >= 45
        decoded = loaded.batch_decode([ids[index] for index in known], skip_special_tokens=True)
        assert decoded == [texts[index] for index in known]


def test_tokenizer_rejects_unknown_algorithm():
    from nvc_hf.data.subword import train_joint_tokenizer

    with pytest.raises(ValueError, match="algorithm='wordpiece'"):
        train_joint_tokenizer(["Ein Hund."], algorithm="wordpiece")


def test_unigram_tokenizer_trains():
    from nvc_hf.data.subword import train_joint_tokenizer

    sources, targets = multi30k_pairs("train", 500)
    tokenizer = train_joint_tokenizer(sources + targets, vocab_size=400, algorithm="unigram")
    assert tokenizer.decode(tokenizer(targets[0])["input_ids"], skip_special_tokens=True) == targets[0]


def test_token_batches_respect_budget():
    from train_translation import TokenBatchSampler, TranslationPairs

    sources, targets = multi30k_pairs("train", 400)
    pairs = TranslationPairs(tiny_tokenizer(), sources, targets, max_length=128)
    source_lengths = [len(ids) for ids in pairs.source_ids]
    target_lengths = [len(ids) for ids in pairs.target_ids]
    sampler = TokenBatchSampler(source_lengths, target_lengths, max_tokens=600, seed=0)

    batches = list(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(400))
    for batch in batches:
        longest = max(max(source_lengths[i], target_lengths[i]) for i in batch)
        assert longest * len(batch) <= 600
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert sorted(map(tuple, sampler)) == sorted(map(tuple, batches))
    with pytest.raises(ValueError, match="--max_tokens=10 is smaller than the longest sentence"):
        TokenBatchSampler(source_lengths, target_lengths, max_tokens=10)


def test_score_translations_signature_and_lengths():
    from evaluate_translation import score_translations

    _, references = multi30k_pairs("test", 30)
    perfect = score_translations(references, references)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in perfect["bleu_signature"]
    assert perfect["bleu_signature"].startswith("nrefs:1|case:mixed")
    shuffled = score_translations(references[1:] + references[:1], references)
    assert shuffled["bleu"] < 20
    with pytest.raises(ValueError, match="Got 29 hypotheses but 30 references"):
        score_translations(references[:-1], references)
