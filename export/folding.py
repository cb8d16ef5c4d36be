"""Fold inference-mode BatchNormalization layers of a Keras model into the layers next to them.

`fold_batchnorm(model)` returns a NEW model and a `FoldReport`; the model passed in is never
changed (its layers are cloned, weights copied, and the clone never shares a variable with it).

Before and after, for a BN after a producer P (kernel w, bias b) and, failing that, for a BN
before a consumer C (a Dense or a conv with padding="valid"):

    x ─► P(w, b) ─► BN(γ, β, mean, var, ε) ─► …      becomes      x ─► P(w', b') ─► …
    … ─► BN ─► C(w, b) ─► …                           becomes      … ─► C(w'', b'') ─► …

    backward:  w' = w·s,  b' = (b − mean)·s + β,  s = γ/√(var+ε)  (on P's output channels)
    forward:   w'' = w·s (on C's input channels),  b'' = b + Σ w·t,  t = β − mean·s

(details and the kernel layouts in `kerasbn.export.fold`). The folded model reproduces the
original in inference mode (`training=False`, as `predict` and the ONNX export run it).

The rewrite is match → can-fold check → rewrite. Every BN call (nested models included, in
topological order) is matched with the layer before it and the layer after it; all checks run
and all new weights are computed before the new model is built. Each failed check is one
record in the report, with a sentence saying why.

The preconditions are numbered in `kerasbn.export.preconditions`; the planning is
`kerasbn.export.plan`, the rebuild `kerasbn.export.rewrite`.

Folds do not cross the boundary of a nested model: its BN layers are folded inside it, and a BN
right after a nested model has no producer here. A BN that a layer calls inside its own `call`
(a `TimeDistributed` wrapper, a subclassed layer or model) is not in any graph: it is "kept" and
recorded with that reason. Raw operations in a functional graph (`keras.ops.add(x, y)`, the
`NotEqual` behind a Masking layer's mask) hold no state and are reused as they are.

Bad input (not a Keras model, a subclassed model, an unbuilt Sequential) raises
TypeError/ValueError; a broken invariant after the rewrite raises RuntimeError.
"""

from __future__ import annotations

from kerasbn.export.model_graph import check_model, count_bn
from kerasbn.export.plan import plan_folds
from kerasbn.export.report import FoldReport
from kerasbn.export.rewrite import rebuild


def fold_batchnorm(model):
    """Fold every foldable inference-mode BN of `model` into its neighbour layer.

    Args:
        model: a built Sequential or Functional Keras model (nested models allowed).

    Returns:
        (folded_model, report): a new model of the same kind without the folded BN layers, and
        a `FoldReport` with one record per BN layer.
    """
    check_model(model)
    plan = plan_folds(model)
    report = FoldReport(plan.records)
    folded_model = rebuild(model, plan)
    _check_result(model, folded_model, report)
    return folded_model, report


def _check_result(model, folded_model, report):
    expected = count_bn(model) - len(report.folded)
    found = count_bn(folded_model)
    if found != expected:
        raise RuntimeError(
            f"Folding should leave {expected} BatchNormalization layers but left {found}. "
            f"Received: model={model.name!r}\n{report}"
        )
    shared = {id(v) for v in model.weights} & {id(v) for v in folded_model.weights}
    if shared:
        raise RuntimeError(
            f"The folded model shares {len(shared)} variables with the original. "
            f"Received: model={model.name!r}"
        )
