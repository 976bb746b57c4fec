"""Helpers for the Hub tests: a small image model trained on real MNIST, an olah server on loopback, subprocesses.

olah (PyPI package `olah`, tested with 0.5.4) serves git repositories under its mirrors path as a Hub endpoint,
fully offline. It pins versions that conflict with the project's environment, so it lives in a virtual environment
of its own: `bash scripts/setup_env.sh` (which creates `.venv-olah`). Set `NVC_OLAH_CLI` to
its `olah-cli` when it is elsewhere.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLAH_CLI = Path(__file__).resolve().parents[1] / ".venv-olah" / "bin" / "olah-cli"
SERVER_START_TIMEOUT = 60.0
SUBPROCESS_TIMEOUT = 240.0

# Prepended to scripts that must run as in a Python without this package: the import of `nvc_hf` fails even though
# the development environment has it installed in editable mode.
BLOCK_PACKAGE_IMPORT = """
import importlib.abc, sys

class _BlockNVCPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvc_hf" or name.startswith("nvc_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process plays a user without nvc_hf)")
        return None

sys.meta_path.insert(0, _BlockNVCPackage())
"""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git(repo: Path, *arguments: str) -> str:
    """Run a git command in `repo` with a fixed author and return its stripped standard output."""
    command = ["git", "-c", "user.name=NVC Tests", "-c", "user.email=tests@nvc-hf.invalid", *arguments]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(arguments)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


@functools.cache
def trained_image_folder() -> Path:
    """Train an NVC image model for 10 steps on 1,280 real MNIST images once per session; return its folder."""
    sys.path.insert(0, str(REPOSITORY_ROOT / "training"))
    import train_image

    root = Path(tempfile.mkdtemp(prefix="nvc-hub-tests-"))
    atexit.register(shutil.rmtree, root, True)
    output_dir = root / "mnist-nvc"
    train_image.main(
        [
            "--output_dir", str(output_dir),
            "--max_steps", "10",
            "--max_train_samples", "1280",
            "--max_eval_samples", "256",
            "--save_steps", "0",
            "--logging_steps", "5",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    return output_dir


def mnist_test_pixels(count: int = 16) -> np.ndarray:
    """The first `count` real MNIST test images as float32 `(count, 1, 28, 28)` in [0, 1]."""
    from nvc_hf.data import load_mnist

    images, _ = load_mnist(REPOSITORY_ROOT / "data" / "mnist", "test")
    return (images[:count].astype(np.float32) / 255.0)[:, None]


def reference_logits(folder: Path, pixel_values: np.ndarray) -> np.ndarray:
    """Logits of the model saved in `folder` (loaded with the package, eval mode) on `pixel_values`."""
    import torch

    from nvc_hf import NVCForImageClassification

    model = NVCForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixel_values)).logits.numpy()


def olah_cli() -> Path:
    """Return the `olah-cli` executable, or fail the test with the commands that install it."""
    path = Path(os.environ.get("NVC_OLAH_CLI", DEFAULT_OLAH_CLI))
    if not path.is_file():
        found = shutil.which("olah-cli")
        if found is None:
            pytest.fail(
                f"olah-cli not found at {path} or on PATH; install it with `bash scripts/setup_env.sh` "
                "(which creates .venv-olah) or set NVC_OLAH_CLI to its path."
            )
        path = Path(found)
    return path


class OlahServer:
    """An olah server on 127.0.0.1 that serves the git repositories under `root/mirrors` as a Hub endpoint."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.mirrors_path = root / "mirrors"
        self.config_path = root / "olah.toml"
        self.log_path = root / "logs"
        self.process: subprocess.Popen | None = None
        for folder in (self.mirrors_path, root / "repos", self.log_path):
            folder.mkdir(parents=True, exist_ok=True)
        netloc = f"127.0.0.1:{self.port}"
        self.config_path.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"mirrors-path = [{json.dumps(str(self.mirrors_path))}]\n"
            f"repos-path = {json.dumps(str(root / 'repos'))}\n"
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{netloc}"\n'
            f'mirror-lfs-netloc = "{netloc}"\n'
            "\n[accessibility]\n"
            "offline = true\n"
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo_path(self, repo_id: str) -> Path:
        """Folder of the git repository that olah serves as the model repository `repo_id`."""
        return self.mirrors_path / "models" / repo_id

    def add_repo(self, repo_id: str, folder: Path, message: str) -> str:
        """Commit the files of `folder` as branch `main` of a new repository `repo_id`; return the commit sha."""
        repo = self.repo_path(repo_id)
        shutil.copytree(folder, repo)
        git(repo, "init", "--quiet", "--initial-branch", "main")
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "--message", message)
        return git(repo, "rev-parse", "HEAD")

    def start(self, ready_repo_id: str) -> None:
        """Start `olah-cli -c CONFIG --log-path DIR`; wait until it returns the `main` revision of `ready_repo_id`."""
        output = open(self.root / "olah-output.log", "wb")
        self.process = subprocess.Popen(
            [str(olah_cli()), "-c", str(self.config_path), "--log-path", str(self.log_path)],
            cwd=self.root,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        url = f"{self.endpoint}/api/models/{ready_repo_id}/revision/main"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with code {self.process.returncode}:\n{self.output_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"olah did not answer {url} within {SERVER_START_TIMEOUT:.0f} s:\n{self.output_tail()}")

    def revision_info(self, repo_id: str, revision: str = "main") -> dict:
        """The JSON that olah returns for `GET /api/models/<repo_id>/revision/<revision>`."""
        with urllib.request.urlopen(f"{self.endpoint}/api/models/{repo_id}/revision/{revision}", timeout=10) as reply:
            return json.loads(reply.read())

    def stop(self) -> None:
        """Stop the server by its process id; wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def output_tail(self, lines: int = 30) -> str:
        log = self.root / "olah-output.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def hub_environment(endpoint: str | None, hf_home: Path, offline: bool = False, with_package: bool = True) -> dict:
    """Environment of a user process: Hub endpoint, cache folder and offline mode; `nvc_hf` importable or not."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(
        {"HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    )
    if endpoint is not None:
        environment["HF_ENDPOINT"] = endpoint
    environment.pop("PYTHONPATH", None)
    if with_package:
        environment["PYTHONPATH"] = str(REPOSITORY_ROOT)
    return environment


def run_python(
    script: str, environment: dict, cwd: Path, with_package: bool = True, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `script` in a new Python process from `cwd`; with `check`, fail the test if it exits non-zero.

    Standard input is closed, as in CI, so a prompt such as transformers' remote-code question cannot wait for input.
    """
    if not with_package:
        script = BLOCK_PACKAGE_IMPORT + script
    result = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"Subprocess exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result
