"""Model cards: the card the image training script writes parses back with complete Hub metadata."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from hub_testing import REPOSITORY_ROOT, trained_image_folder
from huggingface_hub import ModelCard

from nvc_hf import NVCConfig, NVCVisionConfig
from nvc_hf.model_card import MetricSpec, check_model_card, describe_test_subset, write_model_card


REPO_ID = "nvc-test/mnist-nvc"


@pytest.fixture
def model_folder(tmp_path):
    """A copy of the trained model folder that a test may change."""
    folder = tmp_path / "mnist-nvc"
    shutil.copytree(trained_image_folder(), folder)
    return folder


def test_training_card_metadata():
    folder = trained_image_folder()
    results = json.loads((folder / "results.json").read_text())["test"]
    card = ModelCard.load(folder / "README.md")
    data = card.data

    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert {"nvc", "image-classification", "nvc-vision"} <= set(data.tags)
    assert data.datasets == ["mnist"]
    assert data.license == "cc-by-sa-3.0"
    assert len(data.eval_results) >= 5
    for result in data.eval_results:
        assert isinstance(result.metric_value, (int, float)) and math.isfinite(result.metric_value), result
        assert result.metric_type, result
        assert result.dataset_type == "mnist", result
        assert result.dataset_name == "MNIST", result
        assert result.dataset_split == "test[:256]", result
    values = {result.metric_name: result.metric_value for result in data.eval_results}
    assert values["Accuracy"] == round(results["accuracy"], 4)
    assert values["NMI of k-means on latent means"] == round(results["kmeans_nmi"], 4)
    assert check_model_card(folder / "README.md") == []


def test_training_card_body_sections():
    text = (trained_image_folder() / "README.md").read_text()

    for heading in ("## How to load it", "## NVC settings", "## Results", "## Training data and licence"):
        assert heading in text
    assert "## Limitations" in text
    assert "AutoModelForImageClassification.from_pretrained(" in text
    assert 'trust_remote_code=True, revision="<commit sha>"' in text
    assert "import nvc_hf" in text
    assert "| `kl_prior` | `anchor` |" in text
    assert "![Latent space" in text
    assert "(latent_space.png)" in text
    assert "CC BY-SA 3.0" in text
    assert "@article{wang2024nebula" in text


def test_cluster_metric_config_in_model_index():
    folder = trained_image_folder()
    results = json.loads((folder / "results.json").read_text())["test"]
    card = ModelCard.load(folder / "README.md")
    configs = {result.metric_name: result.metric_config for result in card.data.eval_results}

    assert configs["Clustering ACC of anchor assignments"] == results["anchor_cluster_accuracy_mapping"]
    assert configs["Clustering ACC of k-means on latent means"] in ("hungarian", "majority")
    assert configs["Accuracy"] is None


def test_baseline_column_and_repo_id(model_folder):
    config = NVCVisionConfig.from_pretrained(model_folder)
    results = json.loads((model_folder / "results.json").read_text())["test"]
    # Only the table layout is under test here, so the baseline reuses this model's values with another accuracy.
    baseline = {"accuracy": 0.5, "kmeans_nmi": results["kmeans_nmi"]}
    write_model_card(
        model_folder, config, "image-classification", "MNIST", results, {}, baseline_results=baseline, repo_id=REPO_ID
    )
    text = (model_folder / "README.md").read_text()
    card = ModelCard.load(model_folder / "README.md")

    assert "| metric | split | this model | without NVC |" in text
    assert f"| Accuracy | test | {results['accuracy']:.4f} | 0.5000 |" in text
    assert "| NMI of anchor assignments | test | " in text
    assert "| - |" in text
    assert f'pipeline("image-classification", model="{REPO_ID}")' in text
    assert {result.metric_name: result.metric_value for result in card.data.eval_results}["Accuracy"] == round(
        results["accuracy"], 4
    )


def test_custom_metric_with_signature(model_folder):
    config = NVCVisionConfig.from_pretrained(model_folder)
    signature = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    metrics = [MetricSpec("score", "Some score", "bleu", config_key="score_signature", split="validation")]
    write_model_card(
        model_folder,
        config,
        "image-classification",
        "MNIST",
        {"score": 31.25, "score_signature": signature},
        {},
        metrics=metrics,
    )
    (result,) = ModelCard.load(model_folder / "README.md").data.eval_results

    assert (result.metric_type, result.metric_value, result.metric_config) == ("bleu", 31.25, signature)
    assert result.dataset_split == "validation"


def test_label_free_drops_accuracy(model_folder):
    config = NVCVisionConfig.from_pretrained(model_folder)
    results = json.loads((model_folder / "results.json").read_text())["test"]
    write_model_card(model_folder, config, "image-classification", "MNIST", results, {}, label_free=True)
    card = ModelCard.load(model_folder / "README.md")
    names = {result.metric_name for result in card.data.eval_results}

    assert "Accuracy" not in names
    assert "NMI of anchor assignments" in names
    assert "trained label-free" in card.text


def test_unknown_model_type_rejected(model_folder):
    class AudioConfig(NVCConfig):
        model_type = "nvc-audio"

    with pytest.raises(ValueError, match="model_type='nvc-audio'.*nvc-point, nvc-text, nvc-vision"):
        write_model_card(model_folder, AudioConfig(), "audio-classification", "MNIST", {}, {})


def test_card_needs_saved_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="call save_pretrained"):
        write_model_card(tmp_path, NVCVisionConfig(), "image-classification", "MNIST", {"accuracy": 0.9}, {})


def test_check_reports_result_without_value(model_folder):
    readme = model_folder / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    first_value = next(index for index, line in enumerate(lines) if line.strip().startswith("value:"))
    readme.write_text("".join(lines[:first_value] + lines[first_value + 1 :]))

    problems = check_model_card(readme)

    assert problems, "a result without a value passed the check"
    assert any("no numeric value" in problem or "cannot be parsed" in problem for problem in problems), problems


def test_check_reports_missing_metadata(model_folder):
    readme = model_folder / "README.md"
    readme.write_text(readme.read_text().replace("library_name: transformers\n", "").replace("- nvc\n", ""))

    problems = check_model_card(readme)

    assert any("'library_name'" in problem for problem in problems), problems
    assert any("do not include 'nvc'" in problem for problem in problems), problems


def test_card_states_test_subset():
    card = ModelCard.load(trained_image_folder() / "README.md")
    table_rows = [line for line in card.text.splitlines() if line.startswith("| Accuracy |")]

    assert "Measured on the first 256 of 10,000 test images of MNIST" in card.text
    assert {result.dataset_split for result in card.data.eval_results} == {"test[:256]"}
    assert len(table_rows) == 1
    assert table_rows[0].startswith("| Accuracy | test[:256] |")


def test_card_records_no_local_path():
    folder = trained_image_folder()
    text = (folder / "README.md").read_text()

    assert str(folder) not in text
    assert str(REPOSITORY_ROOT) not in text
    assert '"dataset": "data/mnist"' in text
    assert f'"output_dir": "<local>/{folder.name}"' in text


def test_local_dataset_path_named_by_folder(model_folder, tmp_path):
    config = NVCVisionConfig.from_pretrained(model_folder)
    results = json.loads((model_folder / "results.json").read_text())["test"]
    dataset_folder = tmp_path / "private" / "digits-v2"
    arguments = {"image": {"dataset": str(dataset_folder)}, "files": f"{dataset_folder}/a.txt,{dataset_folder}/b.txt"}

    write_model_card(model_folder, config, "image-classification", str(dataset_folder), results, arguments)
    card = ModelCard.load(model_folder / "README.md")

    assert str(tmp_path) not in card.content
    assert card.data.datasets == ["digits-v2"]
    assert '"files": "<local>/a.txt,<local>/b.txt"' in card.text


@pytest.mark.parametrize(
    "used, total, selection, expected",
    [
        (10000, 10000, "first", "all 10,000 test images"),
        (2000, 10000, "first", "the first 2,000 of 10,000 test images"),
        (100, 908, "random", "a seeded random sample of 100 of 908 test images"),
    ],
)
def test_describe_test_subset(used, total, selection, expected):
    assert describe_test_subset(used, total, "images", selection) == expected


def test_describe_test_subset_rejects_empty():
    with pytest.raises(ValueError, match="used=0; it must be between 1 and 10 examples"):
        describe_test_subset(0, 10, "images")
