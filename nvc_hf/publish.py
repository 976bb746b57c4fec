"""Validate a trained NVC model folder and upload it to the Hugging Face Hub in one commit.

Command line (installed as `nvc-publish`):

    nvc-publish runs/mnist-nvc your-name/mnist-nvc --dry-run
    nvc-publish runs/mnist-nvc your-name/mnist-nvc --private --commit-message "Add the MNIST demo model"

The token comes from `HF_TOKEN` or from `hf auth login`; `HF_ENDPOINT` selects another Hub-compatible server.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx2  # huggingface_hub 2.x sends its requests with httpx2, so connection failures are httpx2 errors
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging as transformers_logging

from .model_card import CARD_FILE, PLOT_FILE, check_model_card


logger = logging.getLogger(__name__)

NVC_MODEL_TYPES = ("nvc-vision", "nvc-text", "nvc-point")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Files with an `auto_map` of their own: the config and the saved preprocessing.
AUTO_MAP_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
# Training leftovers that do not belong in a model repository.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "**/__pycache__/**", "*.pyc", ".ipynb_checkpoints/**"]

EXIT_INVALID_FOLDER = 1
EXIT_HUB_ERROR = 3


class ModelFolderError(ValueError):
    """Raised when a model folder is not ready to publish; the message lists every problem found."""


class PublishError(RuntimeError):
    """Raised when the Hub rejects or cannot receive an upload; the message states what to do."""


@dataclass
class FolderSummary:
    """Summary of a folder that passed validation."""

    model_type: str
    architecture: str
    code_files: list[str] = field(default_factory=list)
    num_parameters: int = 0


def _auto_map_modules(auto_map: dict) -> dict[str, str]:
    """Map each class reference of an `auto_map` (values may be lists with `None`) to its Auto class."""
    references = {}
    for auto_class, value in auto_map.items():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if reference:
                references[reference] = auto_class
    return references


def _flat_imports(code_file: Path) -> tuple[set[str], set[str]]:
    """Return the sibling modules a code file imports (`from .x import y`) and its absolute `nvc_hf` imports."""
    tree = ast.parse(code_file.read_text(), filename=str(code_file))
    siblings, package_imports = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                siblings.add(node.module)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "nvc_hf":
                package_imports.add(node.module)
        elif isinstance(node, ast.Import):
            package_imports.update(alias.name for alias in node.names if alias.name.split(".")[0] == "nvc_hf")
    return siblings, package_imports


def check_code_files(folder: Path, problems: list[str]) -> list[str]:
    """Check that every `auto_map` reference points at a code file in `folder`, with all its flat imports."""
    references = {}
    for filename in AUTO_MAP_FILES:
        path = folder / filename
        if path.is_file():
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
            references.update(
                {reference: (filename, auto_class) for reference, auto_class in _auto_map_modules(auto_map).items()}
            )

    pending, seen = [], set()
    for reference, (filename, auto_class) in references.items():
        if "--" in reference:
            problems.append(
                f"{filename} maps {auto_class} to {reference!r}, code in another repository; save the model with "
                "the nvc_hf classes registered so the code files are copied into the folder."
            )
            continue
        module = reference.rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            problems.append(f"{filename} maps {auto_class} to {reference!r}, but {module}.py is not in the folder.")
        else:
            pending.append(module)

    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        siblings, package_imports = _flat_imports(folder / f"{module}.py")
        for name in sorted(package_imports):
            problems.append(
                f"{module}.py imports {name}, which fails where the package is not installed; use a flat sibling "
                "import such as `from .nebula import NVCBottleneck`."
            )
        for sibling in sorted(siblings):
            if (folder / f"{sibling}.py").is_file():
                pending.append(sibling)
            else:
                problems.append(f"{module}.py imports .{sibling}, but {sibling}.py is not in the folder.")
    return sorted(f"{module}.py" for module in seen)


def architecture_reference(folder: Path, config: dict) -> str | None:
    """Find the `module.Class` reference of the saved architecture; return `None` when no code file defines it.

    Usually an `auto_map` entry names it. A head without an Auto class of its own, such as the point-cloud
    classifier, is found in the module of the folder's `AutoModel` entry.
    """
    architecture = config["architectures"][0]
    references = _auto_map_modules(config.get("auto_map") or {})
    for reference in references:
        if reference.endswith("." + architecture):
            return reference
    for reference, auto_class in references.items():
        module = reference.rsplit(".", 1)[0]
        code_file = folder / f"{module}.py"
        if auto_class == "AutoModel" and "--" not in module and code_file.is_file():
            tree = ast.parse(code_file.read_text(), filename=str(code_file))
            if any(isinstance(node, ast.ClassDef) and node.name == architecture for node in tree.body):
                return f"{module}.{architecture}"
    return None


def check_weights_load(folder: Path, config: dict, problems: list[str]) -> int:
    """Load the model with the folder's own code, as `trust_remote_code=True` does; return its parameter count."""
    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    architecture = config["architectures"][0]
    reference = architecture_reference(folder, config)
    if reference is None:
        problems.append(
            f"No code file in the folder defines the architecture {architecture!r} (config.json auto_map does not "
            "name it); save the model with the nvc_hf classes registered."
        )
        return 0
    try:
        model_class = get_class_from_dynamic_module(reference, str(folder))
        model, loading_info = model_class.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    except Exception as error:  # any failure of the folder's own code or weights is a validation failure
        problems.append(f"The model does not load from the folder with its own code: {type(error).__name__}: {error}")
        return 0
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in loading_info.get(kind) or [])
        if keys:
            problems.append(
                f"Loading the weights reports {len(keys)} {kind.replace('_', ' ')}: {', '.join(keys[:5])}."
            )
    return sum(parameter.numel() for parameter in model.parameters())


def check_plot(folder: Path, problems: list[str]) -> None:
    """Check that the latent plot exists and is a readable image, when the model card shows one.

    The image and point-cloud scripts write the plot and embed it in the card; the translation script writes none.
    """
    from PIL import Image, UnidentifiedImageError

    plot = folder / PLOT_FILE
    card = folder / "README.md"
    if not plot.exists() and card.is_file() and PLOT_FILE not in card.read_text(errors="replace"):
        return
    if not plot.is_file():
        problems.append(
            f"{PLOT_FILE} (the latent plot the card shows) is not in the folder; the training script writes it."
        )
        return
    try:
        with Image.open(plot) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as error:
        problems.append(f"{PLOT_FILE} is not a readable image: {error}")


def validate_model_folder(folder: str | Path) -> FolderSummary:
    """
    Check that a folder written by a training script is ready to publish, and raise `ModelFolderError` if not.

    Checks that:
    - `config.json` names an NVC head and its architecture,
    - every `auto_map` entry points at a code file in the folder, and the flat sibling imports of each code file
      are in the folder too,
    - the weights load with that code without missing, unexpected or mismatched keys,
    - the model card parses with complete metadata, and the latent plot is a readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder {str(folder)!r} does not exist or is not a folder.")

    problems: list[str] = []
    config_file = folder / "config.json"
    config = {}
    if not config_file.is_file():
        problems.append("config.json is missing; save the model with save_pretrained.")
    else:
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            problems.append(f"config.json is not valid JSON: {error}")

    model_type = config.get("model_type")
    if config and model_type not in NVC_MODEL_TYPES:
        problems.append(f"config.json has model_type={model_type!r}; expected one of {', '.join(NVC_MODEL_TYPES)}.")
    if config and not config.get("architectures"):
        problems.append("config.json lists no architectures; save the model with save_pretrained.")
    auto_map = config.get("auto_map") or {}
    if config and ("AutoConfig" not in auto_map or not any(key.startswith("AutoModel") for key in auto_map)):
        problems.append(
            f"config.json auto_map {auto_map!r} lacks AutoConfig or an AutoModel class, so the model cannot load with "
            "trust_remote_code=True; import nvc_hf before save_pretrained so the classes are registered."
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"No weights found: expected {' or '.join(WEIGHT_FILES)}.")

    code_files = check_code_files(folder, problems) if config else []
    num_parameters = 0
    if not problems:
        # Loading runs the folder's code, so it only starts once the files it needs are known to be there.
        num_parameters = check_weights_load(folder, config, problems)
    problems.extend(check_model_card(folder / CARD_FILE))
    check_plot(folder, problems)

    if problems:
        listing = "\n".join(f"- {problem}" for problem in problems)
        raise ModelFolderError(f"Model folder {str(folder)!r} is not ready to publish:\n{listing}")
    return FolderSummary(model_type, config["architectures"][0], code_files, num_parameters)


def describe_hub_error(error: Exception, repo_id: str, revision: str | None, endpoint: str) -> str:
    """Explain a failed Hub request in one sentence that states what to do."""
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing was uploaded; unset HF_HUB_OFFLINE and run the command again."
    if isinstance(error, (httpx2.TransportError, ConnectionError)):
        return (
            f"Could not reach the Hub at {endpoint} ({type(error).__name__}); check the network connection, the "
            "proxy settings and HF_ENDPOINT, then run the command again."
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return (
                f"The Hub at {endpoint} rejected the token (401 Unauthorized); set HF_TOKEN to a valid token with "
                "write access or run `hf auth login`."
            )
        if status == 403:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your"
            return (
                f"The token may not write to {repo_id} (403 Forbidden); use a token with write access to the "
                f"{namespace} namespace, or publish under your own user name."
            )
        if status == 404:
            branch = f" or its branch {revision!r}" if revision else ""
            return f"{repo_id}{branch} was not found on {endpoint} (404 Not Found); check the repo id and --revision."
        message = (error.server_message or str(error)).splitlines()[0]
        return f"The Hub at {endpoint} returned {status} ({message}); check the message and run the command again."
    if isinstance(error, ValueError) and "README.md" in str(error):
        return f"The Hub rejected the model card metadata ({str(error).splitlines()[-1]}); fix README.md and retry."
    return f"Upload to {endpoint} failed ({type(error).__name__}: {error})."


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a valid model repository id (`name` or `namespace/name`); raise `ValueError` if not."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid repo id {repo_id!r}: {error}") from None
    return repo_id


def publish_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
) -> str | None:
    """
    Validate `folder` and upload it to the model repository `repo_id` in one commit; return the commit sha.

    The repository is created if needed (`private` applies only then). `revision` names the branch to commit to; a
    missing branch is created from `main`. With `dry_run` only the validation runs and `None` is returned. The token
    defaults to `HF_TOKEN` or the one saved by `hf auth login`; it is never logged.

    Raises:
        `ValueError`: `repo_id` is not a valid repository id. `ModelFolderError`: the folder is not ready to publish.
        `PublishError`: the Hub rejected the upload or could not be reached, or no token was found.
    """
    check_repo_id(repo_id)
    summary = validate_model_folder(folder)
    logger.info(
        f"{folder} is ready to publish: {summary.architecture} ({summary.model_type}, "
        f"{summary.num_parameters:,} parameters), code files {', '.join(summary.code_files)}."
    )
    if dry_run:
        return None

    token = token or get_token()
    if not token:
        raise PublishError("No Hugging Face token found; set HF_TOKEN or run `hf auth login`, then run again.")
    api = HfApi(endpoint=endpoint, token=token)
    commit_message = commit_message or f"Upload {summary.architecture} ({summary.model_type}) with nvc_hf"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.TransportError, ConnectionError, ValueError) as error:
        raise PublishError(describe_hub_error(error, repo_id, revision, api.endpoint)) from error
    logger.info(f"Uploaded {folder} to {commit.commit_url}")
    return commit.oid


def _repo_id_argument(value: str) -> str:
    try:
        return check_repo_id(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nvc-publish",
        description="Validate a trained NVC model folder and upload it to the Hugging Face Hub in one commit.",
        epilog="The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub-compatible server.",
    )
    parser.add_argument("folder", help="Model folder written by a training script (config, weights, code, card).")
    parser.add_argument("repo_id", type=_repo_id_argument, help="Target model repository, e.g. your-name/mnist-nvc.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private (new repos only).")
    parser.add_argument("--revision", default=None, help="Branch to commit to (default main); created if missing.")
    parser.add_argument("--commit-message", default=None, help="Commit message (default names the architecture).")
    parser.add_argument("--dry-run", action="store_true", help="Only validate the folder; upload nothing.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `nvc-publish`; return 0 on success, 1 for an invalid folder, 3 for a Hub error (argparse exits with 2)."""
    arguments = parse_arguments(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    transformers_logging.disable_progress_bar()
    try:
        sha = publish_folder(
            arguments.folder,
            arguments.repo_id,
            private=arguments.private,
            revision=arguments.revision,
            commit_message=arguments.commit_message,
            dry_run=arguments.dry_run,
        )
    except ModelFolderError as error:
        print(error, file=sys.stderr)
        return EXIT_INVALID_FOLDER
    except PublishError as error:
        print(f"nvc-publish: {error}", file=sys.stderr)
        return EXIT_HUB_ERROR
    if sha is None:
        print(f"{arguments.folder} is ready to publish to {arguments.repo_id} (dry run, nothing uploaded).")
    else:
        print(f"Published {arguments.folder} to {arguments.repo_id} at commit {sha}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
