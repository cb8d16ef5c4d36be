"""Real architectures: the smallest `keras.applications` model of each family through `to_onnx`.

Models nobody on the team wrote, built as `benchmarks/zoo.py` builds them (`weights=None`, the
smallest input each accepts, every BN with non-trivial statistics and γ/β; see
`benchmarks/_zoo_models.py`). Families come from the installed Keras, so a new Keras's new
family is tested without a change here. Each must export and verify with `to_onnx`'s defaults,
leave no ONNX BatchNormalization node and no multiply-add of a BN it reports folded, refuse
nothing, and never give more nodes than tf2onnx's export of the unfolded model.
"""

import gc
import os

import keras
import numpy as np
import onnx
import onnxruntime
import pytest

from benchmarks import _zoo_models
from kerasbn.export import to_onnx
from kerasbn.export.float64_reference import float64_twin
from kerasbn.export.verification import FLOAT32_ERROR_FACTOR, FLOAT32_ERROR_LIMIT

FAMILIES = _zoo_models.smallest_per_family()
# `make test` runs each architecture in a process of its own (KERASBN_ZOO_ONLY=name): the
# largest (InceptionResNetV2) with what earlier ones leave behind exceeds 24 GiB in one process.
ONLY = os.environ.get("KERASBN_ZOO_ONLY")
ARCHITECTURES = [ONLY] if ONLY else sorted(FAMILIES.values())
VERIFY_IMAGES = 4

@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory):
    """(model, report, ONNX proto) of one architecture, exported once for all its checks."""
    name = request.param
    model, size = _zoo_models.build(name)
    images = _zoo_models.random_images(name, size, VERIFY_IMAGES, seed=1)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    report = to_onnx(model, path, samples=images)
    yield model, images, report, path
    # One architecture at a time: without this, each one's graphs and traces stay alive and
    # the file's peak memory is the sum over all of them (14 GiB measured).
    del model, report
    keras.backend.clear_session()
    gc.collect()


def bn_names(model):
    return {layer.name for layer in _zoo_models.batch_norm_layers(model)}


@pytest.mark.slow
def test_exports_and_verifies(exported):
    model, images, report, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    assert report.verified_samples == VERIFY_IMAGES  # real samples given: no random ones
    # Read back here, against `predict`: finite, and within the tolerance to_onnx reported
    # (relative to each example's largest |logit|, as `kerasbn.export.verification` defines it);
    # where to_onnx says it judged the file against the model in float64, against that model,
    # with the allowance the README documents: FLOAT32_ERROR_FACTOR × Keras's own float32 error
    # on the example.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: images})
    expected = model.predict(images, verbose=0)
    assert np.isfinite(expected).all() and np.isfinite(got).all()
    allowance = 0.0
    if report.verification.float32_error is not None:
        exact = float64_twin(model).predict(images.astype("float64"), verbose=0)
        own = np.abs(expected - exact).max(axis=1, keepdims=True)
        assert (own <= FLOAT32_ERROR_LIMIT * np.abs(exact).max(axis=1, keepdims=True)).all()
        expected, allowance = exact, FLOAT32_ERROR_FACTOR * own
    scale = np.abs(expected).max(axis=1, keepdims=True)
    assert (np.abs(got - expected) <= report.atol + report.rtol * scale + allowance).all()


@pytest.mark.slow
def test_every_bn_is_reported_and_none_refused(exported):
    model, _, report, _ = exported
    records = report.fold.records
    assert sorted(r.bn.rsplit("/", 1)[-1] for r in records) == sorted(bn_names(model))
    assert report.fold.refused == ()
    for record in report.fold.kept:
        assert record.reason, record


@pytest.mark.slow
def test_no_batch_normalization_or_folded_multiply_add_left(exported):
    model, _, report, path = exported
    proto = onnx.load(path)
    assert _zoo_models.op_count(proto, "BatchNormalization") == 0
    folded = [r.bn.rsplit("/", 1)[-1] for r in report.fold.folded]
    assert _zoo_models.bn_arithmetic(proto, model, folded) == {}
    if bn_names(model):
        assert folded, "an architecture with BN layers had none folded"


@pytest.mark.slow
def test_never_more_nodes_than_the_unfolded_export(exported):
    _, _, report, path = exported
    assert report.node_count == len(onnx.load(path).graph.node)
    unfolded = report.unfolded_node_count
    assert unfolded is not None
    assert report.node_count <= unfolded


def test_every_family_of_the_installed_keras_is_covered():
    # The families the issue names, at least; a new Keras may add more (then they are run too).
    expected = {
        "convnext", "densenet", "efficientnet", "efficientnet_v2", "inception_resnet_v2",
        "inception_v3", "mobilenet", "mobilenet_v2", "mobilenet_v3", "nasnet", "resnet",
        "resnet_v2", "vgg", "xception",
    }
    assert expected <= set(FAMILIES)
    for group, members in _zoo_models.families().items():
        assert FAMILIES[group] in members
