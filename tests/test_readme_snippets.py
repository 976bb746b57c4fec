"""README snippets run as written, with standard input closed as in CI, against a model trained by the script."""

from __future__ import annotations

import re

from hub_testing import REPOSITORY_ROOT, hub_environment, mnist_test_pixels, run_python, trained_image_folder
from PIL import Image


REMOTE_CODE_PROMPT = "Do you wish to run the custom code?"


def readme_python_block(containing: str) -> str:
    """Return the README's Python code block that contains `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", (REPOSITORY_ROOT / "README.md").read_text(), flags=re.S)
    matches = [block for block in blocks if containing in block]
    assert len(matches) == 1, f"expected one README Python block with {containing!r}, found {len(matches)}"
    return matches[0]


def test_image_pipeline_snippet_runs_without_prompt(tmp_path):
    snippet = readme_python_block('pipeline("image-classification", model="runs/mnist-nvc")')
    snippet = snippet.replace('"runs/mnist-nvc"', repr(str(trained_image_folder())))
    Image.fromarray((mnist_test_pixels(1)[0, 0] * 255).astype("uint8")).save(tmp_path / "digit.png")
    environment = hub_environment(None, tmp_path / "hf-home", offline=True)

    result = run_python(snippet, environment, tmp_path)

    assert REMOTE_CODE_PROMPT not in result.stdout + result.stderr
    assert "'label':" in result.stdout
    assert "'score':" in result.stdout
