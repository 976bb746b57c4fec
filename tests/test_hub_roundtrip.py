"""Publishing round trip: `nvc-publish` uploads to the loopback upload stand-in, olah serves the result back.

The stand-in writes each commit into a git repository under olah's mirrors path, so the model that users download
through olah is exactly what the command uploaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from hub_head_cases import HEAD_CASES
from hub_testing import (
    OlahServer,
    git,
    hub_environment,
    mnist_test_pixels,
    reference_logits,
    run_python,
    trained_image_folder,
)
from hub_upload_stand_in import HubUploadStandIn

from nvc_hf.publish import publish_folder


REPO_ID = "nvc-test/mnist-nvc"
TOKEN = "hf_standintoken0123456789"
COMMIT_MESSAGE = "Add the MNIST NVC model"
CHECKPOINT_FILE = "checkpoint-10/optimizer.bin"

DOWNLOAD_SCRIPT = """
import numpy as np, torch
from transformers import AutoModelForImageClassification

pixels = torch.from_numpy(np.load("pixels.npy"))
for name, revision in {revisions!r}.items():
    model = AutoModelForImageClassification.from_pretrained(
        {repo_id!r}, revision=revision, trust_remote_code=True, dtype=torch.float32
    ).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        np.save(f"{{name}}.npy", model(pixel_values=pixels).logits.numpy())
"""


def run_publish_command(
    folder: Path, repo_id: str, stand_in: HubUploadStandIn, hf_home: Path, workdir: Path
) -> subprocess.CompletedProcess:
    """Run `nvc-publish FOLDER REPO_ID --commit-message ...` against the upload stand-in in a new process."""
    environment = hub_environment(stand_in.endpoint, hf_home)
    environment["HF_TOKEN"] = TOKEN
    arguments = [str(folder), repo_id, "--commit-message", COMMIT_MESSAGE]
    # The same entry point as the `nvc-publish` console script.
    command = f"import sys\nfrom nvc_hf.publish import main\nsys.exit(main({arguments!r}))"
    return run_python(command, environment, workdir)


@dataclass
class Published:
    folder: Path
    server: OlahServer
    stand_in: HubUploadStandIn
    command_output: str
    workdir: Path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Publish a copy of the trained model (plus a training checkpoint) with the command, then start olah on it."""
    root = tmp_path_factory.mktemp("round-trip")
    folder = root / "mnist-nvc"
    shutil.copytree(trained_image_folder(), folder)
    (folder / CHECKPOINT_FILE).parent.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"optimizer state that must not be uploaded")
    workdir = root / "work"
    workdir.mkdir()

    server = OlahServer(root / "olah")
    with HubUploadStandIn(server.mirrors_path, TOKEN, namespaces=("nvc-test",)) as stand_in:
        result = run_publish_command(folder, REPO_ID, stand_in, root / "hf-home-publish", workdir)
        server.start(REPO_ID)
        try:
            yield Published(folder, server, stand_in, result.stdout, workdir)
        finally:
            server.stop()


def test_command_reports_commit(published):
    sha = git(published.server.repo_path(REPO_ID), "rev-parse", "main")

    assert published.command_output.strip() == f"Published {published.folder} to {REPO_ID} at commit {sha}."
    assert published.server.revision_info(REPO_ID)["sha"] == sha


def test_one_commit_with_folder_files(published):
    repo = published.server.repo_path(REPO_ID)
    committed = set(git(repo, "ls-tree", "-r", "--name-only", "main").splitlines())
    expected = {path.name for path in published.folder.iterdir() if path.is_file()}
    commits = [request for request in published.stand_in.requests if "/commit/" in request[1]]

    assert committed == expected
    assert CHECKPOINT_FILE not in committed
    assert git(repo, "log", "-1", "--format=%s", "main") == COMMIT_MESSAGE
    assert git(repo, "rev-list", "--count", "main") == "2", "expected the initial commit and one upload"
    assert len(commits) == 1
    for name in sorted(expected):
        local_blob = git(published.folder, "hash-object", name)
        assert git(repo, "rev-parse", f"main:{name}") == local_blob, f"{name} differs from the uploaded blob"


def test_download_matches_original(published, tmp_path):
    sha = published.server.revision_info(REPO_ID)["sha"]
    pixels = mnist_test_pixels()
    np.save(published.workdir / "pixels.npy", pixels)
    expected = reference_logits(trained_image_folder(), pixels)
    environment = hub_environment(published.server.endpoint, tmp_path / "hf-home", with_package=False)

    script = DOWNLOAD_SCRIPT.format(revisions={"main": "main", "pinned": sha}, repo_id=REPO_ID)
    run_python(script, environment, published.workdir, with_package=False)

    for name in ("main", "pinned"):
        np.testing.assert_array_equal(np.load(published.workdir / f"{name}.npy"), expected, err_msg=name)


def test_private_branch_publish(published, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    repo_id = "nvc-test/mnist-nvc-branch"

    sha = publish_folder(
        published.folder,
        repo_id,
        private=True,
        revision="dev",
        commit_message="Try the model on a branch",
        token=TOKEN,
        endpoint=published.stand_in.endpoint,
    )

    creates = [json.loads(body) for _, path, body in published.stand_in.requests if path == "/api/repos/create"]
    assert creates[-1]["name"] == "mnist-nvc-branch"
    assert creates[-1].get("private") is True or creates[-1].get("visibility") == "private", creates[-1]
    assert published.server.revision_info(repo_id, "dev")["sha"] == sha
    assert published.server.revision_info(repo_id, "main")["sha"] != sha, "the upload went to main, not to dev"


@pytest.mark.parametrize("head", sorted(HEAD_CASES))
def test_publish_round_trip(head, tmp_path):
    case = HEAD_CASES[head]
    folder = case.train()
    workdir = tmp_path / "work"
    workdir.mkdir()
    server = OlahServer(tmp_path / "olah")
    with HubUploadStandIn(server.mirrors_path, TOKEN, namespaces=("nvc-test",)) as stand_in:
        result = run_publish_command(folder, case.repo_id, stand_in, tmp_path / "hf-home-publish", workdir)
    repo = server.repo_path(case.repo_id)
    sha = git(repo, "rev-parse", "main")
    committed = set(git(repo, "ls-tree", "-r", "--name-only", "main").splitlines())

    assert result.stdout.strip() == f"Published {folder} to {case.repo_id} at commit {sha}."
    assert committed == {path.name for path in folder.iterdir() if path.is_file()}
    assert git(repo, "log", "-1", "--format=%s", "main") == COMMIT_MESSAGE

    # Download the published model back through olah, as a user without the package, pinned to the commit.
    case.write_inputs(folder, workdir)
    expected = case.expected_outputs(folder, workdir)
    server.start(case.repo_id)
    try:
        environment = hub_environment(server.endpoint, tmp_path / "hf-home", with_package=False)
        run_python(case.load_script({"pinned": sha}, True, case.repo_id), environment, workdir, with_package=False)
    finally:
        server.stop()
    case.assert_outputs_equal(workdir, "pinned", expected)
