"""The ablation runner and the results report, on short real MNIST runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import ablate  # noqa: E402
import report  # noqa: E402


# A few steps on a slice of MNIST: enough to exercise every part of a run, not to learn much.
TINY_BUDGET = [
    "--max_steps", "4", "--eval_steps", "2", "--max_train_samples", "600", "--max_eval_samples", "300",
    "--per_device_train_batch_size", "64",
]  # fmt: skip


@pytest.fixture(scope="module")
def ablation_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ablation")
    results, runs = root / "results", root / "runs"
    argv = ["--task", "mnist", "--variants", "a", "c", "--seeds", "1", "--jobs", "2"]
    argv += ["--results_dir", str(results), "--runs_dir", str(runs), "--", *TINY_BUDGET]
    assert ablate.main(argv) == 0
    return results, runs


@pytest.mark.slow
def test_ablate_writes_one_record_per_run(ablation_folders):
    results, _ = ablation_folders
    for variant, bottleneck_type in (("a", "none"), ("c", "nvc")):
        record = json.loads((results / "mnist" / f"{variant}-seed1.json").read_text())
        assert record["variant"] == variant
        assert record["seed"] == 1
        assert record["training_arguments"]["nvc"]["bottleneck_type"] == bottleneck_type
        assert record["training_arguments"]["training"]["max_steps"] == 4
        assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
        assert [entry["step"] for entry in record["validation"]] == [2, 4]
        assert record["wall_seconds"] > 0
        assert record["versions"]["torch"] and record["hardware"]["cpu_count"]
    nvc = json.loads((results / "mnist" / "c-seed1.json").read_text())
    assert nvc["training_arguments"]["nvc"]["kl_prior"] == "standard"
    # The MNIST folder lies inside the repository, so the committed record names it relative to the root.
    assert nvc["training_arguments"]["image"]["dataset"] == "data/mnist"
    assert "anchor_nmi" in nvc["metrics"]


def test_record_paths_become_repository_relative(tmp_path):
    inside = str(ablate.REPOSITORY_ROOT / "data" / "mnist")
    record = {"command": ["python", inside], "arguments": {"output_dir": str(tmp_path), "seed": 3}}
    assert ablate.repository_relative(record) == {
        "command": ["python", "data/mnist"],
        "arguments": {"output_dir": str(tmp_path), "seed": 3},
    }


@pytest.mark.slow
def test_ablate_skips_finished_runs(ablation_folders, capsys):
    results, runs = ablation_folders
    record = results / "mnist" / "a-seed1.json"
    before = record.stat().st_mtime_ns
    argv = ["--task", "mnist", "--variants", "a", "--seeds", "1", "--results_dir", str(results)]
    assert ablate.main([*argv, "--runs_dir", str(runs), "--", *TINY_BUDGET]) == 0
    assert "record exists, skipped" in capsys.readouterr().out
    assert record.stat().st_mtime_ns == before


@pytest.mark.slow
def test_report_writes_tables_and_plots(ablation_folders, tmp_path):
    results, _ = ablation_folders
    output = report.main(
        ["--results_dir", str(results), "--output", str(tmp_path / "RESULTS.md"), "--title", "Tiny budget"]
    )
    text = output.read_text()
    assert text.startswith("# Tiny budget\n")
    assert "## mnist" in text
    assert "| (a) no NVC" in text
    assert "| (c) NVC, KL to N(0, I)" in text
    # One seed per variant: the difference to (a) is shown without an interval, and the verdict gives the reason.
    assert "too few shared seeds for an interval; better than (a) in" in text
    assert (tmp_path / "results" / "mnist-validation.png").stat().st_size > 0
    assert (tmp_path / "results" / "mnist-latents-c.png").stat().st_size > 0
    assert "results/mnist-latents-a.png" in text


@pytest.mark.slow
def test_report_refuses_records_of_different_budgets(ablation_folders, tmp_path):
    results, _ = ablation_folders
    shutil.copytree(results, tmp_path / "results")
    record_path = tmp_path / "results" / "mnist" / "c-seed1.json"
    record = json.loads(record_path.read_text())
    record["budget_arguments"] = ablate.merge_arguments(record["budget_arguments"], ["--max_steps", "8"])
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="c-seed1.json in mnist used a different budget from a-seed1.json"):
        report.main(["--results_dir", str(tmp_path / "results"), "--output", str(tmp_path / "RESULTS.md")])


def test_failed_run_leaves_no_record(tmp_path, capsys):
    argv = ["--task", "mnist", "--variants", "a", "--seeds", "3", "--results_dir", str(tmp_path / "results")]
    argv += ["--runs_dir", str(tmp_path / "runs"), "--", "--no_such_option", "1"]
    assert ablate.main(argv) == 1
    assert not (tmp_path / "results" / "mnist" / "a-seed3.json").exists()
    assert "a-seed3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "mnist", "--variants", "a", "z"], "unknown variant(s) ['z']"),
        (["--task", "mnist", "--seeds", "1", "1"], "repeats a seed"),
        (["--task", "mnist", "--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--task", "mnist", "--threads_per_run", "0"], "--threads_per_run must be at least 1, got 0"),
        (["--task", "cifar"], "invalid choice: 'cifar'"),
        (["--task", "mnist", "--", "--kl_prior", "anchor"], "['--kl_prior'] after -- would change what the variants"),
        (["--task", "mnist", "--", "400"], "'400' comes before any --flag"),
    ],
)
def test_ablate_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        ablate.main(argv)
    assert message in capsys.readouterr().err


def test_overrides_replace_budget_flags_in_place():
    merged = ablate.merge_arguments(("--max_steps", "400", "--eval_steps", "100"), ["--max_steps", "9", "--fp", "a"])
    assert merged == ["--max_steps", "9", "--eval_steps", "100", "--fp", "a"]


def test_paired_difference_matches_hand_computation():
    # Differences 1, 2, 3: mean 2, standard deviation 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3).
    difference = report.paired_difference({1: 11.0, 2: 12.0, 3: 13.0, 4: 99.0}, {1: 10.0, 2: 10.0, 3: 10.0})
    half_width = 4.302653 / math.sqrt(3)
    assert difference["n"] == 3
    assert difference["mean"] == pytest.approx(2.0)
    assert difference["low"] == pytest.approx(2.0 - half_width, abs=1e-5)
    assert difference["high"] == pytest.approx(2.0 + half_width, abs=1e-5)
    assert report.verdict("accuracy", difference) == "no difference from (a) shown"
    assert report.verdict("completion_chamfer", {"n": 3, "mean": 2.0, "low": 1.0, "high": 3.0}) == "WORSE than (a)"
    assert report.verdict("accuracy", {"n": 3, "mean": 2.0, "low": 1.0, "high": 3.0}) == "better than (a)"


def test_report_refuses_foreign_json(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "notes.json").write_text(json.dumps({"task": "mnist"}))
    with pytest.raises(ValueError, match="notes.json is not an ablation record"):
        report.load_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="run training/ablate.py first"):
        report.load_records(tmp_path / "empty")
