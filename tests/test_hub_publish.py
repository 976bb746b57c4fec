"""Publishing: folder validation, the `nvc-publish` command and the one-sentence Hub error messages.

Uploads go to the loopback stand-in for the Hub's upload endpoints. The test environment sets `HF_HUB_OFFLINE=1`,
which huggingface_hub reads once at import, so the tests that reach the stand-in switch its constant off.
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
from hub_testing import REPOSITORY_ROOT, free_port, trained_image_folder
from hub_upload_stand_in import HubUploadStandIn
from huggingface_hub import HfApi

from nvc_hf.publish import (
    EXIT_HUB_ERROR,
    EXIT_INVALID_FOLDER,
    ModelFolderError,
    PublishError,
    describe_hub_error,
    main,
    publish_folder,
    validate_model_folder,
)


TOKEN = "hf_standintoken0123456789"


@pytest.fixture
def model_folder(tmp_path):
    """A copy of the trained model folder that a test may break."""
    folder = tmp_path / "mnist-nvc"
    shutil.copytree(trained_image_folder(), folder)
    return folder


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def stand_in(tmp_path, online):
    with HubUploadStandIn(tmp_path / "mirrors", TOKEN, namespaces=("nvc-test",)) as server:
        yield server


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_validate_trained_folder():
    summary = validate_model_folder(trained_image_folder())

    assert summary.model_type == "nvc-vision"
    assert summary.architecture == "NVCForImageClassification"
    assert summary.code_files == [
        "configuration_nvc.py",
        "configuration_nvc_vision.py",
        "image_processing_nvc.py",
        "modeling_nvc_vision.py",
        "nebula.py",
    ]
    assert summary.num_parameters > 100_000


def test_validate_point_folder():
    from hub_head_cases import trained_point_folder

    summary = validate_model_folder(trained_point_folder())

    assert summary.model_type == "nvc-point"
    assert summary.architecture == "NVCForPointCloudClassification"
    assert "modeling_nvc_point.py" in summary.code_files
    assert summary.num_parameters > 10_000


def break_weights_missing(folder):
    (folder / "model.safetensors").unlink()


def break_weights_truncated(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def break_code_file_missing(folder):
    (folder / "nebula.py").unlink()


def break_auto_map(folder):
    edit_json(folder / "config.json", lambda config: config["auto_map"].update(AutoConfig="configuration_gone.Config"))


def break_processor_auto_map(folder):
    edit_json(
        folder / "preprocessor_config.json",
        lambda config: config["auto_map"].update(AutoImageProcessor="other/repo--image_processing_nvc.Processor"),
    )


def break_package_import(folder):
    modeling = folder / "modeling_nvc_vision.py"
    modeling.write_text(modeling.read_text() + "\nfrom nvc_hf.nebula import NVCBottleneck  # noqa\n")


def break_model_type(folder):
    edit_json(folder / "config.json", lambda config: config.update(model_type="vit"))


def break_card_yaml(folder):
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("library_name: transformers", "library_name: [transformers", 1))


def break_card_missing(folder):
    (folder / "README.md").unlink()


def break_plot_missing(folder):
    (folder / "latent_space.png").unlink()


def break_plot_unreadable(folder):
    (folder / "latent_space.png").write_bytes(b"not a png")


@pytest.mark.parametrize(
    "break_folder, message",
    [
        (break_weights_missing, "No weights found: expected model.safetensors"),
        (break_weights_truncated, "does not load from the folder with its own code"),
        (break_code_file_missing, "imports .nebula, but nebula.py is not in the folder"),
        (break_auto_map, "maps AutoConfig to 'configuration_gone.Config', but configuration_gone.py is not"),
        (break_processor_auto_map, "code in another repository"),
        (break_package_import, "imports nvc_hf.nebula, which fails where the package is not installed"),
        (break_model_type, "model_type='vit'; expected one of nvc-vision, nvc-text, nvc-point"),
        (break_card_yaml, "cannot be parsed as a model card"),
        (break_card_missing, "README.md not found"),
        (break_plot_missing, "latent_space.png (the latent plot the card shows) is not in the folder"),
        (break_plot_unreadable, "latent_space.png is not a readable image"),
    ],
)
def test_validation_names_problem(model_folder, break_folder, message):
    break_folder(model_folder)

    with pytest.raises(ModelFolderError) as raised:
        validate_model_folder(model_folder)

    assert message in str(raised.value)
    assert str(raised.value).startswith(f"Model folder '{model_folder}' is not ready to publish:")


def test_validation_rejects_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist or is not a folder"):
        validate_model_folder(tmp_path / "absent")


def test_dry_run_command(capsys):
    folder = trained_image_folder()

    assert main([str(folder), "nvc-test/mnist-nvc", "--dry-run"]) == 0
    assert "ready to publish to nvc-test/mnist-nvc (dry run, nothing uploaded)" in capsys.readouterr().out


def test_command_invalid_folder(model_folder, capsys):
    break_code_file_missing(model_folder)

    assert main([str(model_folder), "nvc-test/mnist-nvc", "--dry-run"]) == EXIT_INVALID_FOLDER
    assert "nebula.py is not in the folder" in capsys.readouterr().err


def test_console_script_entry_point():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is part of the standard library from Python 3.11")
    pyproject = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())

    assert pyproject["project"]["scripts"]["nvc-publish"] == "nvc_hf.publish:main"


def test_invalid_repo_id():
    with pytest.raises(ValueError, match="Invalid repo id 'no spaces/allowed here'"):
        publish_folder(trained_image_folder(), "no spaces/allowed here", dry_run=True)


def test_command_invalid_repo_id(capsys):
    with pytest.raises(SystemExit) as raised:
        main([str(trained_image_folder()), "a//b", "--dry-run"])

    assert raised.value.code == 2
    assert "Invalid repo id 'a//b'" in capsys.readouterr().err


def test_wrong_token_401(stand_in):
    with pytest.raises(PublishError) as raised:
        publish_folder(trained_image_folder(), "nvc-test/mnist-nvc", token="hf_wrongtoken", endpoint=stand_in.endpoint)

    message = str(raised.value)
    assert "rejected the token (401 Unauthorized)" in message
    assert "hf auth login" in message
    assert "hf_wrongtoken" not in message


def test_foreign_namespace_403(stand_in):
    with pytest.raises(PublishError) as raised:
        publish_folder(trained_image_folder(), "someone-else/mnist-nvc", token=TOKEN, endpoint=stand_in.endpoint)

    assert "may not write to someone-else/mnist-nvc (403 Forbidden)" in str(raised.value)


def test_missing_repo_404(stand_in):
    api = HfApi(endpoint=stand_in.endpoint, token=TOKEN)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as raised:
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="nvc-test/absent", revision="dev")

    message = describe_hub_error(raised.value, "nvc-test/absent", "dev", stand_in.endpoint)

    assert message == (
        f"nvc-test/absent or its branch 'dev' was not found on {stand_in.endpoint} (404 Not Found); "
        "check the repo id and --revision."
    )


def test_unreachable_endpoint(online):
    endpoint = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(PublishError, match=f"Could not reach the Hub at {endpoint} \\(ConnectError\\)"):
        publish_folder(trained_image_folder(), "nvc-test/mnist-nvc", token=TOKEN, endpoint=endpoint)


def test_offline_mode_reported(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set, so nothing was uploaded"):
        publish_folder(trained_image_folder(), "nvc-test/mnist-nvc", token=TOKEN, endpoint="http://127.0.0.1:9")


def test_missing_token(monkeypatch, tmp_path, online):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))

    with pytest.raises(PublishError, match="No Hugging Face token found; set HF_TOKEN or run `hf auth login`"):
        publish_folder(trained_image_folder(), "nvc-test/mnist-nvc")


def test_command_hub_error(stand_in, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stand_in.endpoint)

    assert main([str(trained_image_folder()), "nvc-test/mnist-nvc"]) == EXIT_HUB_ERROR
    error = capsys.readouterr().err
    assert error.startswith("nvc-publish: The Hub at")
    assert "(401 Unauthorized)" in error
    assert "hf_wrongtoken" not in error


def test_validation_accepts_card_without_plot(model_folder):
    # The translation script writes no latent plot and its card shows none; such a folder is ready to publish.
    (model_folder / "latent_space.png").unlink()
    readme = model_folder / "README.md"
    lines = [line for line in readme.read_text().splitlines() if "latent_space.png" not in line]
    readme.write_text("\n".join(lines) + "\n")

    validate_model_folder(model_folder)
