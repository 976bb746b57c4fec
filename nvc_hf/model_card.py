"""Model cards for trained NVC models, rendered from the Jinja template in `model_cards/`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "nvc_model_card.md"
PLOT_FILE = "latent_space.png"

MNIST_DATA_NOTE = (
    "MNIST (LeCun, Cortes and Burges): 60,000 training and 10,000 test images of handwritten digits, 28x28 "
    "grayscale. The MNIST page states that the data is a derivative of NIST data and is commonly quoted as "
    "available under CC BY-SA 3.0; cite LeCun, Cortes and Burges when you use it."
)


@dataclass
class ResultRow:
    """One metric of the results table: its display name, model-index type, split and one value per model."""

    name: str
    metric_type: str
    split: str
    values: dict[str, float] = field(default_factory=dict)


IMAGE_METRICS = (
    ("Accuracy", "accuracy", "accuracy"),
    ("Clustering ACC of anchor assignments", "accuracy", "anchor_cluster_accuracy"),
    ("NMI of anchor assignments", "nmi", "anchor_nmi"),
    ("ARI of anchor assignments", "ari", "anchor_ari"),
    ("Clustering ACC of k-means on latent means", "accuracy", "kmeans_cluster_accuracy"),
    ("NMI of k-means on latent means", "nmi", "kmeans_nmi"),
)


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(
    output_dir: str | Path,
    config,
    task: str,
    dataset_name: str,
    results: dict,
    training_arguments: dict,
    label_free: bool = False,
    baseline_results: dict | None = None,
    model_name: str | None = None,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """Render the model card of a trained image model into `output_dir/README.md` and return it.

    `results` are the test metrics of this model; `baseline_results` (optional) are those of the same network
    with `bottleneck_type="none"`, shown side by side.
    """
    output_dir = Path(output_dir)
    template_path = Path(template_path)
    if not template_path.exists():
        raise FileNotFoundError(
            f"Model card template {template_path} not found; it ships with the repository in model_cards/."
        )
    model_name = model_name or output_dir.name
    columns = {"this model": results}
    if baseline_results is not None:
        columns["without NVC"] = baseline_results

    rows = []
    for display, metric_type, key in IMAGE_METRICS:
        if label_free and key == "accuracy":
            continue
        values = {column: values[key] for column, values in columns.items() if key in values}
        if values:
            rows.append(ResultRow(display, metric_type, "test", values))

    dataset_id = dataset_name.lower()
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=row.split,
            metric_type=row.metric_type,
            metric_name=row.name,
            metric_value=round(float(row.values["this model"]), 4),
        )
        for row in rows
        if "this model" in row.values
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=["nvc", "nebula-variational-coding", task, "nvc_hf"],
        datasets=[dataset_id],
        license="cc-by-sa-3.0" if dataset_id == "mnist" else "other",
        model_name=model_name,
        eval_results=eval_results,
    )

    settings = config.nvc_settings()
    anchor_health = {
        key.removeprefix("final_"): _format(value) for key, value in results.items() if key.startswith("final_anchors")
    }
    training = training_arguments.get("training", {})
    mode = "label-free (reconstruction and NVC losses only)" if label_free else "supervised"
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        summary=(
            f"An image classifier with an NVC bottleneck (`bottleneck_type={config.bottleneck_type!r}`), trained "
            f"{mode} on {dataset_name} with the `nvc_hf` package."
        ),
        num_anchors=config.num_anchors,
        usage_with_package=(
            "import nvc_hf  # registers the NVC classes with the Auto classes\n"
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("image-classification", model="{model_name}")\n'
            'print(classifier("digit.png"))'
        ),
        usage_remote_code=(
            "from transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{model_name}", trust_remote_code=True, '
            'revision="<commit sha>")\n'
            f'processor = AutoImageProcessor.from_pretrained("{model_name}", trust_remote_code=True, '
            'revision="<commit sha>")'
        ),
        nvc_settings=settings,
        anchor_health=anchor_health,
        results_note=(
            f"Measured on the {dataset_name} test set after {results.get('global_step', '?')} optimizer steps "
            f"({_format(results.get('train_minutes', float('nan')))} minutes on {results.get('num_processes', 1)} "
            "process(es)). Clustering ACC maps each cluster to its majority label when there are more clusters than "
            "classes, and uses the Hungarian one-to-one mapping otherwise."
        ),
        result_columns=list(columns),
        result_rows=[
            {"name": row.name, "split": row.split, "values": [_format(row.values.get(c, "-")) for c in columns]}
            for row in rows
        ],
        plot_file=PLOT_FILE if (output_dir / PLOT_FILE).exists() else None,
        training_summary=(
            "Training arguments (also in `training_args.json`):\n\n```json\n"
            + json.dumps(training, indent=2)
            + "\n```"
        ),
        data_note=MNIST_DATA_NOTE if dataset_id == "mnist" else f"Trained on {dataset_name}; see its licence.",
        limitations=(
            "A small convolutional network for 28x28 grayscale digits; it is not meant for natural images. "
            "The anchor clusters follow the training data and need not match class labels one to one. "
            "Figures come from one training run and one seed unless stated otherwise."
        ),
    )
    card.save(output_dir / "README.md")
    return card
