"""Model cards for trained NVC models of every head, rendered from the Jinja template in `model_cards/`.

Every training script calls [`write_model_card`] after `save_pretrained`. The config's `model_type` selects the
head's description, metrics and limitations. The files saved in the folder select the load snippets.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "nvc_model_card.md"
PLOT_FILE = "latent_space.png"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class DatasetInfo:
    """
    The data a model was trained and evaluated on, as named on the card.

    Args:
        name: Display name, e.g. `"MNIST"`.
        hub_id: Dataset id for the card metadata and the model index, e.g. `"mnist"` or `"bentrevett/multi30k"`.
        licence: Hub licence id of the data (`"cc-by-sa-3.0"`, ...), or `"other"`; the card's licence defaults to it.
        description: Sentences on the source of the data and its licence terms.
        config: Dataset configuration, e.g. a language pair such as `"de-en"`.
    """

    name: str
    hub_id: str
    licence: str
    description: str
    config: str | None = None


@dataclass(frozen=True)
class MetricSpec:
    """
    One metric of the results table and the model index.

    Args:
        key: Key of the value in the results dict of the training script.
        name: Display name, e.g. `"BLEU"`.
        metric_type: Metric id of the model index, e.g. `"accuracy"`, `"bleu"`, `"nmi"`.
        config_key: Key in the results dict whose string describes how the metric was computed, for example the
            sacreBLEU signature. The model index stores it as the metric's `config`.
        split: Dataset split the value was measured on.
        needs_labels: Whether the metric scores a classifier that label-free training leaves untrained.
    """

    key: str
    name: str
    metric_type: str
    config_key: str | None = None
    split: str = "test"
    needs_labels: bool = False


@dataclass(frozen=True)
class HeadCard:
    """
    Description, metrics, pipeline example and limitations of one NVC head, as its model card states them.

    `pipeline_task` and `pipeline_input` add a `pipeline(...)` call to the load snippets; leave `pipeline_task`
    `None` for a head that no pipeline serves. `pipeline_input` is a Python expression, and a training script may
    replace it with an input of its own and the model's output for it (see `example` of [`write_model_card`]).
    `package_pipeline_class` names the package's pipeline class for a folder that declares its pipeline under
    `custom_pipelines`: transformers 5.25 then asks for `trust_remote_code=True` or an explicit `pipeline_class`.
    """

    description: str
    metrics: tuple[MetricSpec, ...]
    limitations: str
    results_note: str = ""
    pipeline_task: str | None = None
    pipeline_input: str | None = None
    package_pipeline_class: str | None = None


CLUSTER_METRICS = (
    MetricSpec(
        "anchor_cluster_accuracy",
        "Clustering ACC of anchor assignments",
        "accuracy",
        "anchor_cluster_accuracy_mapping",
    ),
    MetricSpec("anchor_nmi", "NMI of anchor assignments", "nmi"),
    MetricSpec("anchor_ari", "ARI of anchor assignments", "ari"),
    MetricSpec(
        "kmeans_cluster_accuracy",
        "Clustering ACC of k-means on latent means",
        "accuracy",
        "kmeans_cluster_accuracy_mapping",
    ),
    MetricSpec("kmeans_nmi", "NMI of k-means on latent means", "nmi"),
)
CLUSTER_NOTE = (
    "Clustering ACC maps each cluster to its majority label when there are more clusters than classes, and uses the "
    "Hungarian one-to-one mapping otherwise; the model index records which one as the metric's config."
)

# The point-cloud script reports more metrics than these and passes its own list as `metrics=`.
HEAD_CARDS = {
    "nvc-vision": HeadCard(
        description="An image classifier with an NVC bottleneck between its convolutional encoder and classifier",
        metrics=(MetricSpec("accuracy", "Accuracy", "accuracy", needs_labels=True), *CLUSTER_METRICS),
        limitations=(
            "A small convolutional network for 28x28 grayscale digits; it is not meant for natural images. "
            "The anchor clusters follow the training data and need not match class labels one to one."
        ),
        results_note=CLUSTER_NOTE,
        pipeline_task="image-classification",
        pipeline_input='"digit.png"',
    ),
    "nvc-text": HeadCard(
        description="A Transformer encoder-decoder for translation with an NVC bottleneck on the encoder states",
        metrics=(
            MetricSpec("bleu", "BLEU", "bleu", "bleu_signature"),
            MetricSpec("chrf", "chrF", "chrf", "chrf_signature"),
            *CLUSTER_METRICS[:2],
        ),
        limitations=(
            "A small translation model trained on one corpus; expect poor output on text unlike its training data. "
            "Anchor assignments are made per token and need not correspond to linguistic categories."
        ),
        results_note="BLEU and chrF are corpus scores computed with sacreBLEU; the signature is in the model index.",
        # The package registers this task, and a saved folder declares it under `custom_pipelines` for remote code.
        pipeline_task="translation",
        package_pipeline_class="NVCTranslationPipeline",
    ),
    "nvc-point": HeadCard(
        description="A point-cloud classifier with an NVC bottleneck between its point encoder and classifier",
        metrics=(MetricSpec("accuracy", "Accuracy", "accuracy", needs_labels=True), *CLUSTER_METRICS),
        limitations=(
            "A small point encoder for normalised object point clouds of a fixed size; it is not meant for scenes. "
            "The anchor clusters follow the training data and need not match class labels one to one."
        ),
        results_note=CLUSTER_NOTE,
    ),
}

KNOWN_DATASETS = {
    "mnist": DatasetInfo(
        name="MNIST",
        hub_id="mnist",
        licence="cc-by-sa-3.0",
        description=(
            "MNIST (LeCun, Cortes and Burges): 60,000 training and 10,000 test images of handwritten digits, 28x28 "
            "grayscale. The MNIST page states that the data is a derivative of NIST data and is commonly quoted as "
            "available under CC BY-SA 3.0; cite LeCun, Cortes and Burges when you use it."
        ),
    ),
}

# Files that select the Auto class of the saved preprocessing, in order of preference.
PROCESSOR_FILES = (
    ("processor_config.json", "AutoProcessor"),
    ("preprocessor_config.json", "AutoImageProcessor"),
    ("tokenizer_config.json", "AutoTokenizer"),
)

CITATION = """@article{wang2024nebula,
  title   = {Self-supervised Latent Space Optimization with Nebula Variational Coding},
  author  = {Wang, Yida and Tan, David Joseph and Navab, Nassir and Tombari, Federico},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume  = {46},
  number  = {3},
  pages   = {1397--1411},
  year    = {2024}
}"""


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_local_path(value: str) -> bool:
    """Check whether a dataset argument names a local file or folder rather than a Hub dataset id (`org/name`)."""
    return os.path.isabs(os.path.expanduser(value)) or value.startswith(("./", "../")) or Path(value).exists()


def shorten_local_path(value: str) -> str:
    """Return a path as a card may show it: relative to the repository when inside it, otherwise its last part.

    A card is published, so it must not record the folders of the machine that trained the model.
    """
    path = Path(value).expanduser()
    if not path.is_absolute():
        return value
    try:
        return path.resolve().relative_to(TEMPLATE_PATH.parents[1]).as_posix()
    except ValueError:
        return f"<local>/{path.name}"


def redact_local_paths(arguments):
    """Copy nested training arguments, replacing every absolute path in a string with its shortened form."""
    if isinstance(arguments, dict):
        return {key: redact_local_paths(value) for key, value in arguments.items()}
    if isinstance(arguments, (list, tuple)):
        return [redact_local_paths(value) for value in arguments]
    if isinstance(arguments, str) and any(os.path.isabs(os.path.expanduser(part)) for part in arguments.split(",")):
        # Options such as `--train_files source,target` hold several paths.
        return ",".join(shorten_local_path(part) for part in arguments.split(","))
    return arguments


def describe_test_subset(used: int, total: int, unit: str, selection: str = "first") -> str:
    """Describe the evaluation data for a card, e.g. "the first 2,000 of 10,000 test images".

    `selection` is `"first"` for a leading slice or `"random"` for a seeded random sample; `unit` is a plural noun.
    """
    if selection not in ("first", "random"):
        raise ValueError(f"Invalid selection {selection!r}; pass 'first' or 'random'.")
    if not 0 < used <= total:
        raise ValueError(f"Invalid test subset size used={used}; it must be between 1 and {total} examples.")
    if used == total:
        return f"all {total:,} test {unit}"
    if selection == "first":
        return f"the first {used:,} of {total:,} test {unit}"
    return f"a seeded random sample of {used:,} of {total:,} test {unit}"


def resolve_dataset(dataset: str | DatasetInfo) -> DatasetInfo:
    """Return the [`DatasetInfo`] of a known dataset name (case-insensitive), or a minimal one for any other name.

    A local path is named by its last part, so that no folder of the training machine reaches the card.
    """
    if isinstance(dataset, DatasetInfo):
        return dataset
    known = KNOWN_DATASETS.get(dataset.lower())
    if known is not None:
        return known
    if _is_local_path(dataset):
        dataset = Path(dataset).expanduser().name or dataset
    return DatasetInfo(
        name=dataset,
        hub_id=dataset.lower(),
        licence="other",
        description=f"Trained on {dataset}; see the dataset's own licence terms before reusing the weights.",
    )


def head_card(model_type: str) -> HeadCard:
    """Return the [`HeadCard`] of an NVC `model_type`; raise `ValueError` naming the known types otherwise."""
    if model_type not in HEAD_CARDS:
        raise ValueError(
            f"No model card description for model_type={model_type!r}; known NVC heads are "
            f"{', '.join(sorted(HEAD_CARDS))}. Add an entry to nvc_hf.model_card.HEAD_CARDS for a new head."
        )
    return HEAD_CARDS[model_type]


def model_auto_class(saved_config: dict) -> str | None:
    """Return the Auto class that loads the saved architecture (its `auto_map` entry), or `None` when none does."""
    architectures = saved_config.get("architectures") or []
    for auto_class, reference in (saved_config.get("auto_map") or {}).items():
        if auto_class.startswith("AutoModel") and architectures and reference.endswith("." + architectures[0]):
            return auto_class
    return None


def class_loading_lines(repo_id: str, saved_config: dict, remote_code: bool) -> list[str]:
    """Write the lines that load an architecture no Auto class serves, by its class name.

    With the package the class is imported from it. Without, `get_class_from_dynamic_module` imports it from the code
    file of the repository that defines the base model for `AutoModel`.
    """
    architecture = saved_config["architectures"][0]
    if not remote_code:
        return [
            "import nvc_hf",
            "",
            f'model = nvc_hf.{architecture}.from_pretrained("{repo_id}")',
        ]
    module = saved_config["auto_map"]["AutoModel"].rsplit(".", 1)[0]
    pinned = 'revision="<commit sha>"'
    return [
        "from transformers.dynamic_module_utils import get_class_from_dynamic_module",
        "",
        f'model_class = get_class_from_dynamic_module("{module}.{architecture}", "{repo_id}", {pinned})',
        f'model = model_class.from_pretrained("{repo_id}", {pinned})',
    ]


def processor_auto_class(folder: Path) -> str | None:
    """Return the Auto class of the preprocessing saved in `folder`, or `None` when there is none."""
    for filename, auto_class in PROCESSOR_FILES:
        if (folder / filename).is_file():
            return auto_class
    return None


def usage_snippet(
    repo_id: str,
    head: HeadCard,
    model_class: str,
    processor_class: str | None,
    remote_code: bool,
    example: tuple[str, str] | None = None,
) -> str:
    """Write the Python lines that load the model from the Hub, with or without this package installed.

    `example` is an input for the pipeline and the model's output for it, shown as a comment.
    """
    load_options = ', trust_remote_code=True, revision="<commit sha>"' if remote_code else ""
    imported = [name for name in (processor_class, model_class) if name]
    if head.pipeline_task is not None:
        imported.append("pipeline")

    lines = [] if remote_code else ["import nvc_hf  # registers the NVC classes with the Auto classes"]
    lines += [f"from transformers import {', '.join(imported)}", ""]
    lines.append(f'model = {model_class}.from_pretrained("{repo_id}"{load_options})')
    if processor_class is not None:
        variable = "tokenizer" if processor_class == "AutoTokenizer" else "processor"
        lines.append(f'{variable} = {processor_class}.from_pretrained("{repo_id}"{load_options})')
    if head.pipeline_task is not None:
        lines.append("")
        pipeline_options = load_options
        if not remote_code and head.package_pipeline_class is not None:
            pipeline_options = f", pipeline_class=nvc_hf.{head.package_pipeline_class}"
        lines.append(f'pipe = pipeline("{head.pipeline_task}", model="{repo_id}"{pipeline_options})')
        pipeline_input = repr(example[0]) if example is not None else head.pipeline_input
        if pipeline_input is not None:
            lines.append(f"print(pipe({pipeline_input}))")
        if example is not None:
            lines.append(f"# {example[1]}")
    return "\n".join(lines)


def select_metrics(
    metrics: Sequence[MetricSpec], columns: dict[str, dict], label_free: bool
) -> list[tuple[MetricSpec, dict[str, float]]]:
    """Pair each metric with its numeric values per results column; drop metrics that no column measured."""
    rows = []
    for metric in metrics:
        if label_free and metric.needs_labels:
            continue
        values = {
            column: results[metric.key] for column, results in columns.items() if _is_number(results.get(metric.key))
        }
        if values:
            rows.append((metric, values))
    return rows


def build_eval_results(
    rows: list[tuple[MetricSpec, dict[str, float]]],
    results: dict,
    task: str,
    dataset: DatasetInfo,
    test_split: str = "test",
) -> list[EvalResult]:
    """Turn this model's values into model-index entries, each with its dataset, split and metric config.

    `test_split` replaces the split `"test"` of the metrics, so a subset can be named, e.g. `"test[:2000]"`.
    """
    eval_results = []
    for metric, values in rows:
        if "this model" not in values:
            continue
        config = results.get(metric.config_key) if metric.config_key else None
        eval_results.append(
            EvalResult(
                task_type=task,
                dataset_type=dataset.hub_id,
                dataset_name=dataset.name,
                dataset_config=dataset.config,
                dataset_split=test_split if metric.split == "test" else metric.split,
                metric_type=metric.metric_type,
                metric_name=metric.name,
                metric_value=round(float(values["this model"]), 4),
                metric_config=str(config) if config is not None else None,
            )
        )
    return eval_results


def write_model_card(
    output_dir: str | Path,
    config,
    task: str,
    dataset_name: str | DatasetInfo,
    results: dict,
    training_arguments: dict,
    label_free: bool = False,
    baseline_results: dict | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    metrics: Sequence[MetricSpec] | None = None,
    license: str | None = None,
    language: Sequence[str] | None = None,
    example: tuple[str, str] | None = None,
    results_note: str = "",
    test_subset: str | None = None,
    test_split: str = "test",
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """
    Render the model card of a trained NVC model of any head into `output_dir/README.md` and return it.

    Call it after `save_pretrained`, because the load snippets are built from the saved `config.json` and
    preprocessing files. `task` is the pipeline tag (`"image-classification"`, `"translation"`, ...). `results` are
    the test metrics of this model; `baseline_results` (optional) are those of the same network with
    `bottleneck_type="none"`, shown side by side. `metrics` defaults to the head's list in [`HEAD_CARDS`];
    `repo_id` (default `<namespace>/<model_name>`) appears in the load snippets.

    `language` lists language codes for the metadata; `example` is a `(input, output)` pair produced by the model,
    shown with the pipeline call; `results_note` adds sentences on how the results were measured. `test_subset`
    describes the evaluation data when it is not the whole test set (see [`describe_test_subset`]), and
    `test_split` names it in the model index, e.g. `"test[:2000]"`. Absolute paths in `training_arguments` and
    `dataset_name` are shortened, so the card records no folder of the training machine.
    """
    output_dir = Path(output_dir)
    template_path = Path(template_path)
    if not template_path.exists():
        raise FileNotFoundError(
            f"Model card template {template_path} not found; it ships with the repository in model_cards/."
        )
    config_file = output_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found; call save_pretrained({str(output_dir)!r}) before write_model_card."
        )
    saved_config = json.loads(config_file.read_text())
    head = head_card(config.model_type)
    dataset = resolve_dataset(dataset_name)
    model_name = model_name or output_dir.name
    repo_id = repo_id or f"<namespace>/{model_name}"

    columns = {"this model": results}
    if baseline_results is not None:
        columns["without NVC"] = baseline_results
    rows = select_metrics(metrics if metrics is not None else head.metrics, columns, label_free)
    eval_results = build_eval_results(rows, results, task, dataset, test_split)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=["nvc", "nebula-variational-coding", task, config.model_type, "nvc_hf"],
        datasets=[dataset.hub_id],
        license=license or dataset.licence,
        model_name=model_name,
        language=list(language) if language else None,
        eval_results=eval_results or None,
    )

    model_class = model_auto_class(saved_config)
    processor_class = processor_auto_class(output_dir)
    if model_class is None:
        usage_with_package = "\n".join(class_loading_lines(repo_id, saved_config, remote_code=False))
        usage_remote_code = "\n".join(class_loading_lines(repo_id, saved_config, remote_code=True))
    else:
        usage_with_package = usage_snippet(repo_id, head, model_class, processor_class, False, example)
        usage_remote_code = usage_snippet(repo_id, head, model_class, processor_class, True, example)
    anchor_health = {
        key.removeprefix("final_"): _format(value) for key, value in results.items() if key.startswith("final_")
    }
    mode = "label-free (reconstruction and NVC losses only)" if label_free else "supervised"
    run_facts = [f"{results['global_step']} optimizer steps" if "global_step" in results else None]
    if _is_number(results.get("train_minutes")):
        run_facts.append(f"{results['train_minutes']:.1f} minutes on {results.get('num_processes', 1)} process(es)")
    run_summary = ", ".join(fact for fact in run_facts if fact)

    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        summary=(
            f"{head.description} (`bottleneck_type={config.bottleneck_type!r}`), trained {mode} on {dataset.name} "
            "with the `nvc_hf` package."
        ),
        num_anchors=config.num_anchors,
        usage_with_package=usage_with_package,
        usage_remote_code=usage_remote_code,
        nvc_settings=config.nvc_settings(),
        anchor_health=anchor_health,
        results_note=" ".join(
            part
            for part in (
                f"Measured on {test_subset or 'the test set'} of {dataset.name}"
                + (f" after {run_summary}." if run_summary else "."),
                results_note,
                head.results_note,
            )
            if part
        ),
        result_columns=list(columns),
        result_rows=[
            {
                "name": metric.name,
                "split": test_split if metric.split == "test" else metric.split,
                "values": [_format(values.get(c, "-")) for c in columns],
            }
            for metric, values in rows
        ],
        plot_file=PLOT_FILE if (output_dir / PLOT_FILE).exists() else None,
        training_summary=(
            "Arguments of the training run (also in `training_args.json`, which keeps the local paths):\n\n"
            "```json\n" + json.dumps(redact_local_paths(training_arguments), indent=2) + "\n```"
        ),
        data_note=dataset.description,
        limitations=head.limitations + " Figures come from one training run and one seed unless stated otherwise.",
        citation=CITATION,
    )
    card.save(output_dir / CARD_FILE)
    return card


def check_model_card(path: str | Path) -> list[str]:
    """
    Parse a written model card with `ModelCard.load` and list what is missing for the Hub; empty when complete.

    Checks the metadata (`library_name`, `pipeline_tag`, the `nvc` tag, `datasets`, `license`) and that every
    model-index result has a numeric value, a metric type and a dataset.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path} not found; write it with nvc_hf.model_card.write_model_card."]
    try:
        card = ModelCard.load(path)
    except Exception as error:  # the YAML parser and the model-index reader raise several types
        return [f"{path} cannot be parsed as a model card: {error}"]

    data = card.data
    problems = []
    for field_name in ("library_name", "pipeline_tag", "license", "datasets"):
        if not getattr(data, field_name, None):
            problems.append(f"{path.name} metadata has no {field_name!r}.")
    if "nvc" not in (data.tags or []):
        problems.append(f"{path.name} metadata tags {data.tags!r} do not include 'nvc'.")
    if not data.eval_results:
        problems.append(f"{path.name} has no model-index results.")
    for index, result in enumerate(data.eval_results or []):
        if not _is_number(result.metric_value):
            problems.append(f"{path.name} result {index} has no numeric value (got {result.metric_value!r}).")
        if not result.metric_type:
            problems.append(f"{path.name} result {index} has no metric type.")
        if not (result.dataset_type and result.dataset_name):
            problems.append(f"{path.name} result {index} has no dataset.")
    return problems


__all__ = [
    "DatasetInfo",
    "HeadCard",
    "MetricSpec",
    "check_model_card",
    "describe_test_subset",
    "redact_local_paths",
    "write_model_card",
]
