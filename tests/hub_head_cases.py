"""The translation and point-cloud heads as the Hub tests use them: a trained folder, inputs, load scripts, outputs.

Each [`HeadCase`] trains its model once per session with the head's own training script on real data and writes
test inputs into a work folder. Its load script loads the model as a user would, with the package or with
`trust_remote_code=True` and no package, and saves the outputs as `<name>-<output>.npy` files. The outputs of the
original folder, loaded with the package in this process, are the expected values.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hub_testing import REPOSITORY_ROOT


MODELNET_SUBSET = REPOSITORY_ROOT / "data" / "modelnet10" / "ModelNet10_pcd_subset.tar.gz"
MAX_NEW_TOKENS = 30

# Translates the tokenised sources with greedy search for every revision in REVISIONS; saves the generated ids, the
# logits of a forward pass over them, and the class module of each load. The sources are tokenised beforehand, because
# AutoTokenizer from a Hub id fails online through olah 0.5.4 (see test_hub_olah_heads.py).
TEXT_LOAD_SCRIPT = """
import json
import numpy as np, torch
from transformers import AutoModelForSeq2SeqLM

batch = {{key: torch.from_numpy(np.load(f"{{key}}.npy")) for key in ("input_ids", "attention_mask")}}
modules = {{}}
for name, revision in {revisions!r}.items():
    model = AutoModelForSeq2SeqLM.from_pretrained({repo_id!r}, revision=revision, dtype=torch.float32{options}).eval()
    with torch.no_grad():
        ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens={max_new_tokens})
        logits = model(**batch, decoder_input_ids=ids).logits
    np.save(f"{{name}}-generated_ids.npy", ids.numpy())
    np.save(f"{{name}}-logits.npy", logits.numpy())
    modules[name] = type(model).__module__
json.dump(modules, open("modules.json", "w"))
"""

# Tokenises the sources with the tokenizer of every revision in REVISIONS and saves the input ids.
TEXT_TOKENIZER_SCRIPT = """
import json
import numpy as np
from transformers import AutoTokenizer

sources = json.load(open("sources.json"))
for name, revision in {revisions!r}.items():
    tokenizer = AutoTokenizer.from_pretrained({repo_id!r}, revision=revision{options})
    np.save(f"{{name}}-input_ids.npy", tokenizer(sources, return_tensors="np", padding=True)["input_ids"])
"""

# Loads the base model with AutoModel and the classifier by its class name for every revision in REVISIONS; saves
# the classifier's logits and reconstruction and the base model's latent means.
POINT_LOAD_SCRIPT = """
import json
import numpy as np, torch
from transformers import AutoModel
{head_import}

points = torch.from_numpy(np.load("points.npy"))
modules = {{}}
for name, revision in {revisions!r}.items():
    base = AutoModel.from_pretrained({repo_id!r}, revision=revision, dtype=torch.float32{options}).eval()
    model = {head_class}.from_pretrained({repo_id!r}, revision=revision, dtype=torch.float32).eval()
    with torch.no_grad():
        outputs = model(points=points)
        base_outputs = base(points=points)
    np.save(f"{{name}}-logits.npy", outputs.logits.numpy())
    np.save(f"{{name}}-reconstruction.npy", outputs.reconstruction.numpy())
    np.save(f"{{name}}-base_mean.npy", base_outputs.mean.numpy())
    modules[name] = type(model).__module__
    modules[name + "-base"] = type(base).__name__
json.dump(modules, open("modules.json", "w"))
"""

# Translates the sources with the "translation" pipeline built from the Hub id. With the package, `options` names its
# pipeline class, because the folder declares the pipeline under `custom_pipelines` (see nvc_hf.model_card.HeadCard).
TEXT_PIPELINE_SCRIPT = """
import json
from transformers import pipeline

translator = pipeline("translation", model={repo_id!r}{options})
sources = json.load(open("sources.json"))
outputs = translator(sources, num_beams=1, do_sample=False, max_new_tokens={max_new_tokens})
json.dump([output["translation_text"] for output in outputs], open("pipeline_outputs.json", "w"))
"""


@dataclass(frozen=True)
class HeadCase:
    """How the Hub tests train, load and compare one NVC head."""

    name: str
    repo_id: str
    model_class: str
    outputs: tuple[str, ...]
    train: Callable[[], Path]
    write_inputs: Callable[[Path, Path], None]
    expected_outputs: Callable[[Path, Path], dict[str, np.ndarray]]
    load_script: Callable[[dict[str, str], bool], str]
    code_files: tuple[str, ...]

    def assert_outputs_equal(self, workdir: Path, name: str, expected: dict[str, np.ndarray]) -> None:
        """Check every saved output of the load `name` against the original model's, bit for bit."""
        for output in self.outputs:
            np.testing.assert_array_equal(
                np.load(workdir / f"{name}-{output}.npy"), expected[output], err_msg=f"{output} of the {name} load"
            )


def _temporary_folder(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, True)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Translation


@functools.cache
def trained_text_folder() -> Path:
    """Return the tiny translation model that the translation tests train once per session on real Multi30k pairs."""
    import text_helpers

    return text_helpers.trained_text_folder()


def text_sources() -> list[str]:
    """The first 4 German sentences of the real Multi30k test split."""
    from text_helpers import multi30k_pairs

    sources, _ = multi30k_pairs("test", 4)
    return list(sources)


def write_text_inputs(folder: Path, workdir: Path) -> None:
    """Save the sources as `sources.json` and their encoding by the tokenizer in `folder` as `.npy` files."""
    from transformers import AutoTokenizer

    sources = text_sources()
    (workdir / "sources.json").write_text(json.dumps(sources))
    batch = AutoTokenizer.from_pretrained(folder)(sources, return_tensors="np", padding=True)
    for key in ("input_ids", "attention_mask"):
        np.save(workdir / f"{key}.npy", batch[key])


def text_outputs(folder: Path, workdir: Path) -> dict[str, np.ndarray]:
    """Generated ids and logits of the model in `folder`, loaded with the package, on the inputs in `workdir`."""
    from nvc_hf import NVCForConditionalGeneration

    batch = {key: torch.from_numpy(np.load(workdir / f"{key}.npy")) for key in ("input_ids", "attention_mask")}
    model = NVCForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        logits = model(**batch, decoder_input_ids=ids).logits
    return {"generated_ids": ids.numpy(), "logits": logits.numpy()}


def text_load_script(revisions: dict[str, str], remote_code: bool, repo_id: str = "nvc-test/multi30k-nvc") -> str:
    options = ", trust_remote_code=True" if remote_code else ""
    script = TEXT_LOAD_SCRIPT.format(
        revisions=revisions, repo_id=repo_id, options=options, max_new_tokens=MAX_NEW_TOKENS
    )
    # Importing the package registers its classes with the Auto classes.
    return script if remote_code else "import nvc_hf\n" + script


def text_tokenizer_script(revisions: dict[str, str], repo_id: str, options: str = "") -> str:
    return TEXT_TOKENIZER_SCRIPT.format(revisions=revisions, repo_id=repo_id, options=options)


def text_pipeline_script(repo_id: str, options: str = "") -> str:
    return TEXT_PIPELINE_SCRIPT.format(repo_id=repo_id, options=options, max_new_tokens=MAX_NEW_TOKENS)


def text_pipeline_outputs(folder: Path, workdir: Path) -> list[str]:
    """Greedy translations of the sources in `workdir` by the model in `folder`, one sentence at a time as the
    translation pipeline runs them."""
    from transformers import AutoTokenizer

    from nvc_hf import NVCForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = NVCForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    translations = []
    for source in json.loads((workdir / "sources.json").read_text()):
        batch = tokenizer(
            source, return_tensors="pt", truncation=True, max_length=model.config.max_position_embeddings
        )
        with torch.no_grad():
            ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        translations.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return translations


# ---------------------------------------------------------------------------------------------------------------------
# Point clouds


@functools.cache
def trained_point_folder() -> Path:
    """Train a small NVC point-cloud classifier with a decoder for 30 steps on the real ModelNet10 subset."""
    sys.path.insert(0, str(REPOSITORY_ROOT / "training"))
    import train_points

    output_dir = _temporary_folder("nvc-hub-points-") / "modelnet10-nvc"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_points.main(
            [
                "--output_dir", str(output_dir),
                "--max_steps", "30",
                "--eval_steps", "30",
                "--save_steps", "0",
                "--max_eval_samples", "40",
                "--num_train_points", "128",
                "--point_mlp_sizes", "32,64",
                "--hidden_size", "64",
                "--num_anchors", "10",
                "--per_device_train_batch_size", "32",
                "--logging_steps", "10",
                "--disable_tqdm", "true",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return output_dir


def write_point_inputs(folder: Path, workdir: Path) -> None:
    """Save 8 real ModelNet10 test clouds, normalised to the unit sphere, as `points.npy` (`folder` is unused)."""
    from nvc_hf.data.pointclouds import load_modelnet, normalize_clouds

    clouds, _, _, _ = load_modelnet(MODELNET_SUBSET, "test")
    np.save(workdir / "points.npy", normalize_clouds(clouds[::30][:8]).astype(np.float32))


def point_outputs(folder: Path, workdir: Path) -> dict[str, np.ndarray]:
    """Logits, reconstruction and latent means of the model in `folder`, loaded with the package."""
    from nvc_hf import NVCForPointCloudClassification, NVCPointModel

    points = torch.from_numpy(np.load(workdir / "points.npy"))
    model = NVCForPointCloudClassification.from_pretrained(folder, dtype=torch.float32).eval()
    base = NVCPointModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        outputs = model(points=points)
        base_outputs = base(points=points)
    return {
        "logits": outputs.logits.numpy(),
        "reconstruction": outputs.reconstruction.numpy(),
        "base_mean": base_outputs.mean.numpy(),
    }


def point_load_script(revisions: dict[str, str], remote_code: bool, repo_id: str = "nvc-test/modelnet10-nvc") -> str:
    if remote_code:
        # transformers has no Auto class for point-cloud classification, so the classifier is loaded by its name.
        head_import = "from transformers.dynamic_module_utils import get_class_from_dynamic_module"
        head_class = (
            'get_class_from_dynamic_module("modeling_nvc_point.NVCForPointCloudClassification", '
            f"{repo_id!r}, revision=revision)"
        )
        options = ", trust_remote_code=True"
    else:
        head_import, head_class, options = "import nvc_hf", "nvc_hf.NVCForPointCloudClassification", ""
    return POINT_LOAD_SCRIPT.format(
        revisions=revisions, repo_id=repo_id, options=options, head_import=head_import, head_class=head_class
    )


HEAD_CASES = {
    "text": HeadCase(
        name="text",
        repo_id="nvc-test/multi30k-nvc",
        model_class="NVCForConditionalGeneration",
        outputs=("generated_ids", "logits"),
        train=trained_text_folder,
        write_inputs=write_text_inputs,
        expected_outputs=text_outputs,
        load_script=text_load_script,
        code_files=(
            "configuration_nvc.py",
            "configuration_nvc_text.py",
            "modeling_nvc_text.py",
            "nebula.py",
            "pipeline_nvc_text.py",
        ),
    ),
    "point": HeadCase(
        name="point",
        repo_id="nvc-test/modelnet10-nvc",
        model_class="NVCForPointCloudClassification",
        outputs=("logits", "reconstruction", "base_mean"),
        train=trained_point_folder,
        write_inputs=write_point_inputs,
        expected_outputs=point_outputs,
        load_script=point_load_script,
        code_files=("configuration_nvc.py", "configuration_nvc_point.py", "modeling_nvc_point.py", "nebula.py"),
    ),
}
