"""Process-count invariance: one and two processes give the same test metrics and the same anchor usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPOSITORY_ROOT


# Evaluates a seeded, untrained model of each head on the first 203 real test samples in batches of 16 (203 is not a multiple
# of 16 x 2), through each training script's own `predict` and `score`. Then each process runs one training forward
# on its share of 64 samples and one anchor update, whose counts must be summed over the processes.
EVALUATION = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    import train_image, train_points
    from nvc_hf import NVCForImageClassification, NVCForPointCloudClassification, NVCPointConfig, NVCVisionConfig
    from nvc_hf.data import load_mnist
    from nvc_hf.data.pointclouds import load_modelnet, normalize_clouds

    output = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    results = {"num_processes": accelerator.num_processes}

    images, labels = load_mnist("data/mnist", "test")
    clouds, cloud_labels, _, _ = load_modelnet("data/modelnet10/ModelNet10_pcd_subset.tar.gz", "test")
    torch.manual_seed(0)
    heads = {
        "image": (
            NVCForImageClassification(
                NVCVisionConfig(conv_channels=[8, 16], hidden_size=32, latent_size=8, num_anchors=6)
            ),
            torch.as_tensor(images[:203, None] / 255.0, dtype=torch.float32),
            torch.as_tensor(labels[:203], dtype=torch.long),
        ),
        "points": (
            NVCForPointCloudClassification(
                NVCPointConfig(point_mlp_sizes=[16, 32], hidden_size=32, latent_size=8, num_anchors=6)
            ),
            torch.as_tensor(normalize_clouds(clouds[:203]), dtype=torch.float32),
            torch.as_tensor(cloud_labels[:203], dtype=torch.long),
        ),
    }
    for head, (model, inputs, targets) in heads.items():
        bottleneck = model.bottleneck
        model.eval()
        with torch.no_grad():
            means = model.nvc(inputs[:64]).mean
        bottleneck.initialize_anchors(means)

        if head == "image":
            loader = DataLoader(TensorDataset(inputs, targets), batch_size=16)
            prepared, prepared_loader = accelerator.prepare(model, loader)
            predictions = train_image.predict(prepared, prepared_loader, accelerator)
            scores = train_image.score(predictions, 6, seed=0)
        else:
            loader = train_points.make_eval_dataloader(inputs, targets, 16, crop_ratio=0.25)
            prepared, prepared_loader = accelerator.prepare(model, loader)
            predictions = train_points.predict(prepared, prepared_loader, accelerator)
            scores = train_points.score(predictions, 6, 10, seed=0)
        results[head] = {"count": int(len(predictions["labels"])), **scores}

        # Training mode for the anchor bookkeeping, without dropout, whose masks differ between process counts.
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        with accelerator.split_between_processes(list(range(64))) as share:
            model(**({"pixel_values": inputs[share]} if head == "image" else {"points": inputs[share]}))
        results[head + "_anchor_statistics"] = bottleneck.update_anchors()
    if accelerator.is_main_process:
        with open(output, "w") as handle:
            json.dump(results, handle)
    """
)


def evaluate(tmp_path, num_processes: int) -> dict:
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATION)
    output = tmp_path / f"results-{num_processes}.json"
    launcher = [sys.executable]
    if num_processes > 1:
        launcher += [
            "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
        ]  # fmt: skip
    environment = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY_ROOT), str(REPOSITORY_ROOT / "training")]),
    }
    completed = subprocess.run(
        [*launcher, str(script), str(output)],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_one_and_two_processes_agree(tmp_path):
    single = evaluate(tmp_path, 1)
    double = evaluate(tmp_path, 2)
    assert single["num_processes"] == 1
    assert double["num_processes"] == 2

    for head in ("image", "points"):
        # The committed ModelNet10 subset has 200 test clouds; neither count is a multiple of 16 x 2.
        assert single[head]["count"] == double[head]["count"] == {"image": 203, "points": 200}[head]
        assert single[head].keys() == double[head].keys()
        for metric in ("accuracy", "anchor_cluster_accuracy", "anchor_nmi", "anchor_ari"):
            assert single[head][metric] == double[head][metric], (head, metric)
        for metric in single[head]:
            assert single[head][metric] == pytest.approx(double[head][metric], abs=1e-6), (head, metric)

        if head == "points":
            # Scored on clouds cropped before they are split between processes.
            assert "completion_chamfer" in single[head]
            assert single[head]["partial_accuracy"] == double[head]["partial_accuracy"]
            assert single[head]["completion_chamfer"] == pytest.approx(double[head]["completion_chamfer"], abs=1e-6)

        # Counts summed over both processes give the statistics of one process that saw all 64 samples.
        assert single[f"{head}_anchor_statistics"] == double[f"{head}_anchor_statistics"], head
