"""Model cards for trained NVC translation models: the Multi30k data note and sacreBLEU details for the shared writer."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from .model_card import DatasetInfo, write_model_card


MULTI30K = DatasetInfo(
    name="Multi30k",
    hub_id="multi30k",
    licence="other",
    config="de-en",
    description=(
        'Multi30k task 1 (Elliott et al., 2016, "Multi30K: Multilingual English-German Image Descriptions"): '
        "29,000 training, 1,014 validation and 1,000 test (test_2016_flickr) German-English caption pairs from "
        "github.com/multi30k/dataset. The repository has no licence file. Its README says that the data is partly "
        "derived from Flickr30K, that use of the images must follow the Flickr Terms of Use, and that the data is "
        "provided for non-commercial research and educational use. Only the text was used; cite Elliott et al. 2016."
    ),
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
    test_subset: str | None = None,
    test_split: str = "test",
) -> ModelCard:
    """Render the model card of a trained translation model into `output_dir/README.md` and return it.

    `results` are the test scores from `score_translations` (`bleu`, `chrf` and their signatures, `num_sentences`)
    with the training script's `test_num_beams`; `example` is a `(source, translation)` pair produced by the model.
    `test_subset` and `test_split` describe a test set cut short, as in [`write_model_card`].
    """
    dataset = MULTI30K if "multi30k" in dataset_name.lower() else dataset_name
    results = dict(results)
    if "anchors_reseeded" in results:
        # The shared writer lists `final_*` results as the anchor health at the end of training.
        results["final_anchors_reseeded"] = results["anchors_reseeded"]
    beams = results.get("test_num_beams")
    decoding = f"beam search with {beams} beams" if beams and beams > 1 else "greedy decoding"
    results_note = (
        f"The model translated {results['num_sentences']:,} sentences with {decoding}; sacreBLEU scored the "
        "detokenised hypotheses against the raw references."
    )
    return write_model_card(
        output_dir,
        config=config,
        task="translation",
        dataset_name=dataset,
        results=results,
        training_arguments=training_arguments,
        model_name=model_name,
        language=[source_lang, target_lang],
        example=example,
        results_note=results_note,
        test_subset=test_subset,
        test_split=test_split,
    )


__all__ = ["MULTI30K", "write_translation_model_card"]
