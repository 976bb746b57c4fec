"""Translation training (two processes, resuming), evaluation scripts and Seq2SeqTrainer with predict_with_generate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from text_helpers import (
    REPOSITORY_ROOT,
    TINY_MODEL_ARGUMENTS,
    TOKEN_BATCH_DATA_ARGUMENTS,
    multi30k_pairs,
    single_threaded_torch,  # noqa: F401 (autouse fixture)
    tiny_config,
    tiny_tokenizer,
    trained_text_folder,
)


def test_training_script_writes_model_folder():
    folder = trained_text_folder()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "results.json"):
        assert (folder / name).exists(), name

    results = json.loads((folder / "results.json").read_text())
    test = results["test"]
    assert test["num_sentences"] == 20
    assert "tok:13a" in test["bleu_signature"]
    assert test["best_step"] in {entry["step"] for entry in results["validation"]}
    assert [entry["step"] for entry in results["validation"]] == [75, 150]
    assert all(entry["train_minutes"] > 0 for entry in results["validation"])
    translations = (folder / "test_translations.txt").read_text().splitlines()
    assert len(translations) == 20


def test_model_card_reports_scores():
    import math

    from huggingface_hub import ModelCard

    from nvc_hf.model_card import check_model_card

    folder = trained_text_folder()
    card = ModelCard.load(folder / "README.md")
    results = json.loads((folder / "results.json").read_text())["test"]
    evaluations = card.data.eval_results
    assert card.data.pipeline_tag == "translation"
    assert card.data.language == ["de", "en"]
    assert card.data.datasets == ["multi30k"]
    assert [entry.metric_type for entry in evaluations] == ["bleu", "chrf"]
    for entry in evaluations:
        assert isinstance(entry.metric_value, float) and math.isfinite(entry.metric_value), entry
        assert entry.dataset_type == "multi30k", entry
        assert entry.dataset_name == "Multi30k", entry
        assert entry.dataset_config == "de-en", entry
    assert evaluations[0].metric_value == round(results["bleu"], 4)
    assert evaluations[1].metric_value == round(results["chrf"], 4)
    assert evaluations[0].metric_config == results["bleu_signature"]
    assert evaluations[1].metric_config == results["chrf_signature"]
    assert check_model_card(folder / "README.md") == []


def test_model_card_body():
    folder = trained_text_folder()
    text = (folder / "README.md").read_text()
    first_translation = (folder / "test_translations.txt").read_text().splitlines()[0]
    (first_source,), _ = multi30k_pairs("test", 1)

    assert "| `latent_size` | `32` |" in text
    assert "| `bottleneck_level` | `sentence` |" in text
    assert f"print(pipe({first_source!r}))" in text
    assert f"# {first_translation}" in text
    assert "pipeline_class=nvc_hf.NVCTranslationPipeline)" in text
    assert 'pipeline("translation", model="<namespace>/' in text
    assert "AutoModelForSeq2SeqLM.from_pretrained(" in text
    assert "AutoTokenizer.from_pretrained(" in text
    assert 'trust_remote_code=True, revision="<commit sha>"' in text
    assert "Flickr Terms of Use" in text
    assert "non-commercial research" in text
    assert "@article{wang2024nebula" in text


def test_model_card_states_test_subset():
    from huggingface_hub import ModelCard

    folder = trained_text_folder()
    card = ModelCard.load(folder / "README.md")

    assert "the first 20 of 1,000 test sentences" in card.text
    assert {entry.dataset_split for entry in card.data.eval_results} == {"test[:20]"}
    assert "| BLEU | test[:20] |" in card.text


def test_model_card_records_no_local_path():
    folder = trained_text_folder()
    text = (folder / "README.md").read_text()

    assert str(folder) not in text
    assert str(REPOSITORY_ROOT) not in text
    assert '"dataset": "data/multi30k"' in text


def test_training_script_rejects_misaligned_files(tmp_path):
    import train_translation

    sources, targets = multi30k_pairs("train", 10)
    (tmp_path / "train.de").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "train.en").write_text("\n".join(targets[:9]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.de has 10 lines but .*train\.en has 9"):
        train_translation.main(
            [
                "--output_dir", str(tmp_path / "out"),
                "--train_files", f"{tmp_path / 'train.de'},{tmp_path / 'train.en'}",
                "--validation_files", f"{tmp_path / 'train.de'},{tmp_path / 'train.de'}",
                "--test_files", f"{tmp_path / 'train.de'},{tmp_path / 'train.de'}",
            ]
        )  # fmt: skip


def test_evaluation_script_scores_split(tmp_path):
    import evaluate_translation

    output_file = tmp_path / "scores.json"
    results = evaluate_translation.main(
        [
            "--model", str(trained_text_folder()),
            "--split", "validation",
            "--max_samples", "7",
            "--batch_size", "3",
            "--num_beams", "1",
            "--output_file", str(output_file),
        ]
    )  # fmt: skip
    saved = json.loads(output_file.read_text())
    assert saved["bleu"] == results["bleu"]
    assert len(saved["hypotheses"]) == 7
    assert (
        saved["bleu_signature"]
        == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" + saved["bleu_signature"].split("version:")[1]
    )


def test_translate_keeps_input_order():
    from evaluate_translation import translate
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = trained_text_folder()
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sources, _ = multi30k_pairs("validation", 9)
    batched = translate(model, tokenizer, sources, batch_size=4, num_beams=1, max_new_tokens=30)
    one_by_one = [translate(model, tokenizer, [source], num_beams=1, max_new_tokens=30)[0] for source in sources]
    assert batched == one_by_one


def test_two_process_shares_match_one_process():
    from evaluate_translation import merge_shares, translate_share
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = trained_text_folder()
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # 7 sentences: not a multiple of batch size (2) times processes (2).
    sources, references = multi30k_pairs("validation", 7)
    settings = dict(batch_size=2, num_beams=1, max_new_tokens=30)

    single = merge_shares(translate_share(model, tokenizer, sources, 0, 1, **settings), len(sources))
    shares = [translate_share(model, tokenizer, sources, rank, 2, **settings) for rank in (0, 1)]
    assert sorted(index for index, _ in shares[0]) == [0, 2, 4, 6]
    assert sorted(index for index, _ in shares[1]) == [1, 3, 5]
    merged = merge_shares(shares[0] + shares[1], len(sources))
    assert merged == single

    from evaluate_translation import score_translations

    assert score_translations(merged, references)["bleu"] == score_translations(single, references)["bleu"]
    with pytest.raises(ValueError, match="expected each of 0..6 exactly once"):
        merge_shares(shares[0] + shares[0], len(sources))
    with pytest.raises(ValueError, match="expected each of 0..6 exactly once"):
        merge_shares(shares[0], len(sources))


def test_seq2seq_trainer_predict_with_generate(tmp_path):
    import datasets
    from evaluate_translation import score_translations
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from nvc_hf import NVCAnchorCallback, NVCForConditionalGeneration

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = NVCForConditionalGeneration(tiny_config(anchor_warmup_steps=2))

    def tokenize(split, count):
        sources, targets = multi30k_pairs(split, count)
        encoded = tokenizer(sources, text_target=targets, truncation=True, max_length=64)
        return datasets.Dataset.from_dict(dict(encoded))

    def compute_metrics(prediction):
        predictions = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = score_translations(hypotheses, references)
        return {"bleu": scores["bleu"], "chrf": scores["chrf"]}

    arguments = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=8,
        max_steps=12,
        learning_rate=3e-3,
        predict_with_generate=True,
        generation_max_length=24,
        generation_num_beams=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=4,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=arguments,
        train_dataset=tokenize("train", 192),
        eval_dataset=tokenize("validation", 16),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[NVCAnchorCallback()],
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    metrics = trainer.evaluate()

    assert metrics["eval_loss"] < before
    assert "eval_bleu" in metrics
    assert 0 <= metrics["eval_chrf"] <= 100
    # The NVC anchors were initialised during training (warm-up of 2 steps).
    assert bool(model.bottleneck.anchors_initialized)


def test_script_defaults_keep_the_head_latent_size():
    from loop import NVCArguments

    from nvc_hf import NVCPointConfig, NVCTextConfig, NVCVisionConfig

    kwargs = NVCArguments().config_kwargs(total_steps=100)
    # The translation head needs a wide per-token latent; the image and point heads a small per-example one.
    assert NVCTextConfig(**kwargs).latent_size == NVCTextConfig().latent_size == 256
    assert NVCVisionConfig(**kwargs).latent_size == NVCVisionConfig().latent_size
    assert NVCPointConfig(**kwargs).latent_size == NVCPointConfig().latent_size
    assert NVCTextConfig(**NVCArguments(latent_size=64).config_kwargs(total_steps=100)).latent_size == 64


# 120 real pairs in batches of at most 256 tokens: 12 optimizer steps per epoch, so 18 steps cross an epoch
# boundary. Evaluation runs only at the last step, so the saved (best) weights are the final weights.
TOKEN_BATCH_RUN = [
    *TOKEN_BATCH_DATA_ARGUMENTS,
    "--max_steps", "18",
    "--eval_steps", "18",
    "--anchor_warmup_ratio", "0.25",
    "--learning_rate", "3e-3",
    "--logging_steps", "4",
    "--disable_tqdm", "true",
    "--test_num_beams", "1",
    "--seed", "7",
    *TINY_MODEL_ARGUMENTS,
]  # fmt: skip


def train_token_batches(output_dir, extra: list[str]) -> dict:
    import train_translation

    return train_translation.main(["--output_dir", str(output_dir), *TOKEN_BATCH_RUN, *extra])


@pytest.mark.slow
def test_translation_resume_matches_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    uninterrupted = tmp_path / "uninterrupted"
    results = train_token_batches(uninterrupted, ["--save_steps", "7"])
    steps_per_epoch = results["steps_per_epoch"]
    # Step 7 lies inside the first epoch and step 14 inside the second, so both resumes skip part of an epoch.
    assert 7 < steps_per_epoch < 14 < 2 * steps_per_epoch
    expected = load_file(uninterrupted / "model.safetensors")

    for step in (7, 14):
        resumed = tmp_path / f"resumed-{step}"
        checkpoint = uninterrupted / f"checkpoint-{step}"
        results = train_token_batches(resumed, ["--save_steps", "0", "--resume_from_checkpoint", str(checkpoint)])
        assert results["global_step"] == 18
        actual = load_file(resumed / "model.safetensors")
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), f"{name} differs after resuming from step {step}"


@pytest.mark.slow
def test_translation_two_processes_keep_identical_weights(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPOSITORY_ROOT / "training" / "train_translation.py"),
        "--output_dir", str(tmp_path),
        "--save_steps", "0",
        *TOKEN_BATCH_RUN,
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())["test"]
    assert results["num_processes"] == 2
    assert results["global_step"] == 18
    checksums = results["replica_checksums"]
    assert len(checksums) == 2
    assert checksums[0] == checksums[1]
