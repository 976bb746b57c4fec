"""Model cards for trained NVC point-cloud models: the ModelNet10 data note and metrics for the shared card writer."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from .model_card import CLUSTER_METRICS, DatasetInfo, MetricSpec, write_model_card


MODELNET10 = DatasetInfo(
    name="ModelNet10",
    hub_id="modelnet10",
    licence="other",
    description=(
        'ModelNet10 (Wu et al., "3D ShapeNets: A Deep Representation for Volumetric Shapes", CVPR 2015): 3,991 '
        "training and 908 test CAD models of 10 furniture classes, here as 1,024 surface points per model "
        "(Poisson-disk samples of the meshes), centred and scaled to the unit sphere. The ModelNet site states that "
        "the CAD models were collected from the internet, that their original authors hold the copyright, and that "
        "the data is provided for the convenience of academic research only. Use this model under the same terms and "
        "cite Wu et al. 2015."
    ),
)

POINT_METRICS = (
    MetricSpec("accuracy", "Overall accuracy", "accuracy", needs_labels=True),
    MetricSpec("mean_class_accuracy", "Mean-class accuracy", "accuracy", needs_labels=True),
    MetricSpec("partial_accuracy", "Accuracy on partial clouds", "accuracy", needs_labels=True),
    *CLUSTER_METRICS,
    MetricSpec("reconstruction_chamfer", "Chamfer distance, reconstruction", "chamfer_distance"),
    MetricSpec("completion_chamfer", "Chamfer distance, completion", "chamfer_distance"),
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
    test_subset: str | None = None,
) -> ModelCard:
    """Render the model card of a trained point-cloud model into `output_dir/README.md` and return it.

    `completion` marks a model trained on partial clouds; its Chamfer rows then describe shape completion.
    `test_subset` describes the evaluation clouds when they are not the whole test split.
    """
    dataset = MODELNET10 if "modelnet10" in dataset_name.lower() else dataset_name
    arguments = {**training_arguments, "completion": completion}
    return write_model_card(
        output_dir,
        config=config,
        task="other",
        dataset_name=dataset,
        results=results,
        training_arguments=arguments,
        label_free=label_free,
        baseline_results=baseline_results,
        model_name=model_name,
        metrics=POINT_METRICS,
        test_subset=test_subset,
    )
