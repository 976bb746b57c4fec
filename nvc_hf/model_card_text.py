"""Model cards for trained NVC translation models, rendered from the shared template in `model_cards/`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .model_card import TEMPLATE_PATH


MULTI30K_DATA_NOTE = (
    'Multi30k task 1 (Elliott et al., 2016, "Multi30K: Multilingual English-German Image Descriptions"): 29,000 '
    "training, 1,014 validation and 1,000 test (test_2016_flickr) German-English caption pairs from "
    "github.com/multi30k/dataset. The repository has no licence file; its README says the data is partly derived "
    "from Flickr30K, that use of the images must follow the Flickr Terms of Use, and that the data is provided for "
    "non-commercial research and educational use. Only the text was used."
)


def write_translation_model_card(
    output_dir: str | Path,
    config,
    dataset_name: str,
    results: dict,
    training_arguments: dict,
    example: tuple[str, str] | None = None,
    source_lang: str = "de",
    target_lang: str = "en",
    model_name: str | None = None,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """Render the model card of a trained translation model into `output_dir/README.md` and return it.

    `results` are the test scores from `score_translations` (`bleu`, `chrf` and their signatures);
    `example` is a `(source, translation)` pair produced by the model.
    """
    output_dir = Path(output_dir)
    model_name = model_name or output_dir.name
    dataset_id = dataset_name.lower()
    split = results.get("split", "test")
    metrics = (
        ("BLEU", "bleu", results["bleu"], results["bleu_signature"]),
        ("chrF", "chrf", results["chrf"], results["chrf_signature"]),
    )
    eval_results = [
        EvalResult(
            task_type="translation",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=f"sacreBLEU {display}",
            metric_value=round(float(value), 2),
            metric_config=signature,
        )
        for display, metric_type, value, signature in metrics
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="translation",
        language=[source_lang, target_lang],
        tags=["nvc", "nebula-variational-coding", "translation", "nvc_hf"],
        datasets=[dataset_id],
        license="other",
        model_name=model_name,
        eval_results=eval_results,
    )

    example_lines = ""
    if example is not None:
        example_lines = f"\nprint(translator({example[0]!r}))\n# {example[1]}"
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        summary=(
            f"A {source_lang}-to-{target_lang} Transformer encoder-decoder with an NVC bottleneck "
            f"(`bottleneck_type={config.bottleneck_type!r}`, `bottleneck_level={config.bottleneck_level!r}`) between "
            f"the encoder and the decoder's cross-attention, trained on {dataset_name} with the `nvc_hf` package."
        ),
        num_anchors=config.num_anchors,
        usage_with_package=(
            "import nvc_hf  # registers the NVC classes with the Auto classes\n"
            "from transformers import pipeline\n\n"
            f'translator = pipeline("translation", model="{model_name}")' + example_lines
        ),
        usage_remote_code=(
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{model_name}", trust_remote_code=True, '
            'revision="<commit sha>")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_name}", trust_remote_code=True, revision="<commit sha>")'
        ),
        nvc_settings=config.nvc_settings(),
        anchor_health={"anchors_reseeded": results["anchors_reseeded"]} if "anchors_reseeded" in results else {},
        results_note=(
            f"sacreBLEU on the {split} split ({results['num_sentences']} sentences), beam size "
            f"{results.get('test_num_beams', '?')}, detokenised hypotheses against the raw references, after "
            f"{results.get('global_step', '?')} optimizer steps ({results.get('train_minutes', float('nan')):.1f} "
            f"training minutes). BLEU signature `{results['bleu_signature']}`, chrF signature "
            f"`{results['chrf_signature']}`."
        ),
        result_columns=["this model"],
        result_rows=[
            {"name": f"sacreBLEU {display}", "split": split, "values": [f"{value:.2f}"]}
            for display, _, value, _ in metrics
        ],
        plot_file=None,
        training_summary=(
            "Training arguments (also in `training_args.json`):\n\n```json\n"
            + json.dumps(training_arguments.get("training", {}), indent=2)
            + "\n```"
        ),
        data_note=MULTI30K_DATA_NOTE if "multi30k" in dataset_id else f"Trained on {dataset_name}; see its licence.",
        limitations=(
            "Trained on image captions only: expect poor translations outside short descriptive sentences. "
            "Figures come from one training run and one seed."
        ),
    )
    card.save(output_dir / "README.md")
    return card


__all__ = ["write_translation_model_card"]
