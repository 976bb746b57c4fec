"""Model cards for trained NVC point-cloud models, rendered from the shared template in `model_cards/`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .model_card import PLOT_FILE, TEMPLATE_PATH, ResultRow, _format


MODELNET_DATA_NOTE = (
    'ModelNet10 (Wu et al., "3D ShapeNets: A Deep Representation for Volumetric Shapes", CVPR 2015): 3,991 '
    "training and 908 test CAD models of 10 furniture classes, here as 1,024 surface points per model (Poisson-disk "
    "samples of the meshes), centred and scaled to the unit sphere. The ModelNet site states that the CAD models "
    "were collected from the internet, that their original authors hold the copyright, and that the data is "
    "provided for the convenience of academic research only. Use this model under the same terms and cite Wu et "
    "al. 2015."
)

POINT_METRICS = (
    ("Overall accuracy", "accuracy", "accuracy"),
    ("Mean-class accuracy", "accuracy", "mean_class_accuracy"),
    ("Accuracy on partial clouds", "accuracy", "partial_accuracy"),
    ("Clustering ACC of anchor assignments", "accuracy", "anchor_cluster_accuracy"),
    ("NMI of anchor assignments", "nmi", "anchor_nmi"),
    ("Clustering ACC of k-means on latent means", "accuracy", "kmeans_cluster_accuracy"),
    ("NMI of k-means on latent means", "nmi", "kmeans_nmi"),
    ("Chamfer distance, reconstruction", "chamfer_distance", "reconstruction_chamfer"),
    ("Chamfer distance, completion", "chamfer_distance", "completion_chamfer"),
)


def write_point_model_card(
    output_dir: str | Path,
    config,
    dataset_name: str,
    results: dict,
    training_arguments: dict,
    label_free: bool = False,
    completion: bool = False,
    baseline_results: dict | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Render the model card of a trained point-cloud model into `output_dir/README.md` and return it.

    `results` are the test metrics of this model; `baseline_results` (optional) are those of the same network
    with `bottleneck_type="none"`, shown side by side.
    """
    output_dir = Path(output_dir)
    model_name = model_name or output_dir.name
    columns = {"this model": results}
    if baseline_results is not None:
        columns["without NVC"] = baseline_results

    rows = []
    for display, metric_type, key in POINT_METRICS:
        if label_free and "accuracy" in key and "cluster" not in key:
            continue
        values = {column: values[key] for column, values in columns.items() if values.get(key) is not None}
        if values:
            rows.append(ResultRow(display, metric_type, "test", values))

    task = "point-cloud-classification"
    dataset_id = dataset_name.lower()
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=row.split,
            metric_type=row.metric_type,
            metric_name=row.name,
            metric_value=round(float(row.values["this model"]), 5),
        )
        for row in rows
        if "this model" in row.values
    ]
    card_data = ModelCardData(
        library_name="transformers",
        tags=["nvc", "nebula-variational-coding", "point-cloud", task, "nvc_hf"],
        datasets=[dataset_id],
        license="other",
        model_name=model_name,
        eval_results=eval_results,
    )

    mode = "label-free (Chamfer and NVC losses only)" if label_free else "supervised"
    if completion:
        mode += ", with shape completion (partial clouds in, whole clouds reconstructed)"
    anchor_health = {
        key.removeprefix("final_"): _format(value) for key, value in results.items() if key.startswith("final_anchors")
    }
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        summary=(
            f"A point-cloud classifier with an NVC bottleneck (`bottleneck_type={config.bottleneck_type!r}`), trained "
            f"{mode} on {dataset_name} with the `nvc_hf` package. Input: clouds of shape `(batch, points, 3)`, "
            "centred and scaled to the unit sphere."
        ),
        num_anchors=config.num_anchors,
        usage_with_package=(
            "from nvc_hf import NVCForPointCloudClassification\n\n"
            f'model = NVCForPointCloudClassification.from_pretrained("{model_name}")\n'
            "logits = model(points=points).logits  # points: (batch, points, 3) in the unit sphere"
        ),
        usage_remote_code=(
            "from transformers import AutoModel\n\n"
            "# transformers has no Auto class for point clouds; this repository maps AutoModel to the classifier.\n"
            f'model = AutoModel.from_pretrained("{model_name}", trust_remote_code=True, revision="<commit sha>")'
        ),
        nvc_settings=config.nvc_settings(),
        anchor_health=anchor_health,
        results_note=(
            f"Measured on the {dataset_name} test set (all 1,024 points per cloud) after "
            f"{results.get('global_step', '?')} optimizer steps ({_format(results.get('train_minutes', float('nan')))} "
            f"minutes on {results.get('num_processes', 1)} process(es)). Chamfer distance: mean squared "
            "nearest-neighbour distance in both directions, summed, in unit-sphere units; completion feeds clouds "
            "with a quarter of the points cut away on one side and compares with the whole cloud."
        ),
        result_columns=list(columns),
        result_rows=[
            {"name": row.name, "split": row.split, "values": [_format(row.values.get(c, "-")) for c in columns]}
            for row in rows
        ],
        plot_file=PLOT_FILE if (output_dir / PLOT_FILE).exists() else None,
        training_summary=(
            "Training arguments (also in `training_args.json`):\n\n```json\n"
            + json.dumps(training_arguments.get("training", {}), indent=2)
            + "\n```"
        ),
        data_note=MODELNET_DATA_NOTE if "modelnet" in dataset_id else f"Trained on {dataset_name}; see its licence.",
        limitations=(
            "A small PointNet-style network without input transforms; it expects aligned, upright clouds like "
            "ModelNet's and sees rotations about the up axis only within the training augmentation. The anchor "
            "clusters follow the training data and need not match class labels one to one. Figures come from one "
            "training run and one seed."
        ),
    )
    card.save(output_dir / "README.md")
    return card
