"""Smoke tests for examples/: each script's `main` runs with tiny settings and produces its
figures and files with sane numbers. (The full runs are what the README's figures come from.)"""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def examples():
    """Imports examples/*.py as modules, the way the scripts see each other (`import _data`)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def assert_png(path, max_kib=150):
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert 0 < path.stat().st_size <= max_kib * 1024, f"{path}: {path.stat().st_size} bytes"


def assert_accuracies(values):
    values = np.asarray(values, dtype=float)
    assert values.size and np.all((values >= 0.0) & (values <= 1.0)), values


# --- _data -------------------------------------------------------------------------------------


def test_digits_split_is_stratified_standardized_and_offline(examples):
    data_module = examples("_data")
    data = data_module.load("digits")
    assert (len(data.x_train), len(data.x_test)) == (1347, 450)
    assert data.input_shape == (8, 8, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    # standardized with the training images' statistics only
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4
    assert sorted(np.unique(data.y_test)) == list(range(10))

    flat = data_module.load("digits", flat=True, per_feature=True)
    assert flat.input_shape == (64,)
    np.testing.assert_allclose(flat.x_train.mean(axis=0), 0.0, atol=1e-4)
    # constant pixels (digits' corners) are left at zero, not divided by zero
    assert np.all(np.isfinite(flat.x_test))


def test_unknown_dataset_names_the_value(examples):
    with pytest.raises(ValueError, match="'cifar'"):
        examples("_data").load("cifar")


@pytest.mark.parametrize("module", ["paper_mnist", "learning_rate", "convnet_export"])
def test_mnist_is_an_option(examples, module):
    # Only argument parsing here: loading MNIST needs the network.
    assert examples(module).parse_args(["--dataset", "mnist"]).dataset == "mnist"
    with pytest.raises(SystemExit):
        examples(module).parse_args(["--dataset", "cifar"])


# --- paper_mnist -------------------------------------------------------------------------------


def test_paper_mnist_quick(examples, tmp_path, capsys):
    result = examples("paper_mnist").main(
        ["--quick", "--steps", "40", "--eval-every", "20", "--out", str(tmp_path)]
    )
    base, bn = result["records"]
    assert (base.name, bn.name) == ("without BN", "with BN")
    for record in (base, bn):
        assert record.steps == [0, 20, 40]
        assert_accuracies(record.accuracy)
        assert len(record.percentiles) == len(record.steps)
        for p15, p50, p85 in record.percentiles:
            assert np.isfinite([p15, p50, p85]).all() and p15 <= p50 <= p85
        assert len(record.unit_median_range) == 100
    # same initial weights: at step 0 (BN at its initial statistics) both probes agree
    np.testing.assert_allclose(base.percentiles[0], bn.percentiles[0], rtol=1e-2, atol=1e-2)
    for figure in result["figures"]:
        assert_png(figure)
    assert {p.name for p in tmp_path.iterdir()} == {
        "paper_mnist_accuracy.png", "paper_mnist_sigmoid_input.png", "paper_mnist.json"}
    printed = capsys.readouterr().out
    assert "Summary" in printed and "percentiles" in printed
    assert "Warning" not in printed and "WARNING" not in printed


# --- learning_rate -----------------------------------------------------------------------------


def test_learning_rate_quick(examples, tmp_path, capsys):
    module = examples("learning_rate")
    result = module.main(["--quick", "--steps", "40", "--runs", "Baseline", "BN-x5",
                          "--out", str(tmp_path)])
    rows = {row["run"]: row for row in result["rows"]}
    assert set(rows) == {"Baseline", "BN-x5"}
    assert rows["BN-x5"]["learning_rate"] == pytest.approx(5 * rows["Baseline"]["learning_rate"])
    for row in rows.values():
        assert_accuracies([row["final_accuracy"], row["best_accuracy"]])
        assert len(row["steps_to_target"]) == row["seeds"] == 1
    assert_png(result["figure"])
    assert (tmp_path / "learning_rate.json").is_file()
    assert "Steps to 97% test accuracy" in capsys.readouterr().out


def test_learning_rate_verdict_says_what_did_not_reproduce(examples):
    module = examples("learning_rate")

    def row(name, reached, final, diverged=0):
        run = next(r for r in module.RUNS if r.name == name)
        return {"run": name, "learning_rate": run.learning_rate, "steps_to_target": [reached],
                "final_accuracy": final, "best_accuracy": final, "diverged": diverged,
                "seeds": 1}

    rows = [row("Baseline", 100, 0.98), row("BN-Baseline", 200, 0.97),
            row("BN-x5", None, 0.95), row("BN-x30", None, 0.10, diverged=1),
            row("BN-x5-Sigmoid", None, 0.10), row("Baseline-Sigmoid", None, 0.10),
            row("Baseline-x5", 50, 0.98), row("Baseline-x30", None, 0.10, diverged=1)]
    lines = module.verdict(rows, target=0.97)
    assert lines[0].startswith("NOT REPRODUCED: no BN run reached 97% sooner")
    assert any(line.startswith("NOT REPRODUCED: BN ends higher") for line in lines)
    assert any(line.startswith("NOT REPRODUCED: BN-x30 did not train") for line in lines)
    assert any(line.startswith("CAVEAT: without BN, lr 0.05 works") for line in lines)
    assert any(line.startswith("REPRODUCED (the premise): without BN, lr 0.3 fails")
               for line in lines)
    assert any(line.startswith("NOT REPRODUCED: BN-x5-Sigmoid final") for line in lines)
    # no test size given: no noise line
    assert not any(line.startswith("Noise") for line in lines)
    assert module.verdict(rows, target=0.97, test_size=450)[-1].startswith("Noise: one test")


def test_steps_to_target_is_the_first_crossing(examples):
    result = examples("learning_rate").Result("r", 0, steps=[0, 10, 20, 30],
                                              accuracy=[0.1, 0.97, 0.9, 0.99])
    assert result.steps_to(0.97) == 10
    assert result.steps_to(0.995) is None


# --- convnet_export (make demo) ----------------------------------------------------------------


@pytest.mark.slow
def test_convnet_export_quick(examples, tmp_path, capsys):
    result = examples("convnet_export").main(["--quick", "--out", str(tmp_path)])
    assert_accuracies([result["accuracy_moving_average"], result["accuracy_population"],
                       result["accuracy_onnx"]])
    assert result["onnx_path"] == tmp_path / "digits_convnet.onnx"
    assert result["onnx_path"].is_file()
    assert len(result["export"].folded) == 4
    assert result["max_error"] < 1e-4
    assert abs(result["accuracy_onnx"] - result["accuracy_population"]) <= 1 / 450
    assert result["population"].layers_updated == 4
    assert all(seconds > 0 for seconds in result["latency"].values())
    printed = capsys.readouterr().out
    assert "BN layers folded" in printed and "4 of 4" in printed


# --- small_batch -------------------------------------------------------------------------------


def test_small_batch_quick(examples, tmp_path, capsys):
    result = examples("small_batch").main(
        ["--quick", "--batch-sizes", "4", "--methods", "BN", "BN+renorm", "BN+ghost",
         "--out", str(tmp_path)]
    )
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"BN", "BN+renorm", "BN+ghost", "BN+population"}
    for row in rows.values():
        assert row["batch_size"] == 4
        assert_accuracies([row["final_accuracy"]])
    curves = {curve.method: curve for curve in result["curves"]}
    # the population curve is measured on the BN run, at the same steps
    assert curves["BN+population"].steps == curves["BN"].steps
    assert curves["BN"].steps[0] == 0 and len(curves["BN"].steps) == 3
    assert_png(result["figure"])
    assert {p.name for p in tmp_path.iterdir()} == {"small_batch.png", "small_batch.json"}
    printed = capsys.readouterr().out
    assert "| batch | no BN | BN | BN+renorm | BN+ghost | BN+population |" in printed
    assert "Warning" not in printed and "WARNING" not in printed


def test_small_batch_ghost_batch_sizes(examples):
    module = examples("small_batch")
    assert [module.ghost_batch_size(n) for n in (2, 4, 8, 32)] == [2, 2, 2, 8]
    with pytest.raises(SystemExit):
        module.parse_args(["--batch-sizes", "1"])
    with pytest.raises(SystemExit):
        module.parse_args(["--target", "1.5"])
