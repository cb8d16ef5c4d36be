"""Tests of `kerasbn.population_statistics` and the `kerasbn.PopulationStatistics` callback.

The reference is a float64 NumPy forward pass of the test network, written from the paper:
each BN layer normalizes with its batch's moments (training mode), dropout is the identity,
and the estimate is Σ m_B·μ_B / Σ m_B and Σ m_B·σ²_B / Σ (m_B − 1) over the batches.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests import reference
from tests.helpers import keras_batch_normalization, tracked_layers

FEATURES, HIDDEN, OUTPUTS = 6, 8, 4
BN_NAMES = ("bn1", "bn2")
BN_KINDS = ("kerasbn_moving_average", "kerasbn_population", "keras")
RTOL, ATOL = 2e-4, 2e-5


# --- the float64 reference -------------------------------------------------------------------


def pooled(moments):
    """Algorithm 2 over per-batch (mean, biased variance, m): (mean, unbiased variance, Σm)."""
    means, variances, counts = (np.stack([m[i] for m in moments]) for i in range(3))
    total = counts.sum(0)
    return (
        (counts * means).sum(0) / total,
        (counts * variances).sum(0) / (counts - 1.0).sum(0),
        total,
    )


def squeeze(moments):
    return tuple(np.reshape(t, -1) for t in moments)


def layers_by_name(model):
    return {layer.name: layer for layer in tracked_layers(model)}


def bn_forward(layer, h):
    """Training-mode BN of a (batch, channels) float64 array: output and its batch moments."""
    gamma = layer.gamma.numpy() if layer.scale else np.ones(h.shape[-1])
    beta = layer.beta.numpy() if layer.center else np.zeros(h.shape[-1])
    y, *moments = reference.forward(h, gamma, beta, (1,), layer.epsilon)
    return y, squeeze(moments)


def dense_reference(model, batches):
    """{bn name: (mean, variance, Σm)} for the net Dense → Dropout → BN → ReLU → Dense → BN."""
    layers = layers_by_name(model)
    dense1, dense2 = (layers[n].get_weights() for n in ("dense1", "dense2"))
    moments = {name: [] for name in BN_NAMES}
    for x in batches:
        h = np.asarray(x, np.float64) @ dense1[0] + dense1[1]
        h, batch_moments = bn_forward(layers["bn1"], h)
        moments["bn1"].append(batch_moments)
        h = np.maximum(h, 0.0) @ dense2[0] + dense2[1]
        moments["bn2"].append(bn_forward(layers["bn2"], h)[1])
    return {name: pooled(m) for name, m in moments.items()}


def assert_statistics(model, expected):
    layers = layers_by_name(model)
    for name, (mean, variance, count) in expected.items():
        layer = layers[name]
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=RTOL, atol=ATOL)
        if getattr(layer, "population_count", None) is not None:
            np.testing.assert_array_equal(layer.population_count.numpy(), count)


def split(x, batch_size):
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


# --- test networks ---------------------------------------------------------------------------


def make_bn(kind, name, **kwargs):
    if kind == "keras":
        return keras_batch_normalization(name=name, **kwargs)
    statistics = kind.removeprefix("kerasbn_")
    return kerasbn.BatchNormalization(statistics=statistics, name=name, **kwargs)


def net_layers(kind, **bn_kwargs):
    """The layers of the dense test net; a high dropout rate shows if dropout were active."""
    return [
        keras.layers.Dense(HIDDEN, name="dense1"),
        keras.layers.Dropout(0.7, name="dropout"),
        make_bn(kind, "bn1", **bn_kwargs),
        keras.layers.ReLU(name="relu"),
        keras.layers.Dense(OUTPUTS, name="dense2"),
        make_bn(kind, "bn2", **bn_kwargs),
    ]


class SubclassedNet(keras.Model):
    def __init__(self, kind):
        super().__init__()
        self.blocks = net_layers(kind)

    def call(self, x, training=None):
        for layer in self.blocks:
            x = layer(x, training=training)
        return x


def sequential(kind):
    return keras.Sequential([keras.Input((FEATURES,)), *net_layers(kind)])


def functional(kind, **bn_kwargs):
    x = inputs = keras.Input((FEATURES,))
    for layer in net_layers(kind, **bn_kwargs):
        x = layer(x)
    return keras.Model(inputs, x)


def subclassed(kind):
    model = SubclassedNet(kind)
    model(np.zeros((2, FEATURES), "float32"))
    return model


def nested(kind):
    """Each BN inside a different kind of sub-model of a Functional model."""
    dense1, dropout, bn1, relu, dense2, bn2 = net_layers(kind)
    first = keras.Sequential([keras.Input((FEATURES,)), dense1, dropout, bn1], name="first")
    inner = keras.Input((OUTPUTS,))
    second = keras.Model(inner, bn2(inner), name="second")
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, second(dense2(relu(first(inputs)))))


TOPOLOGIES = {"sequential": sequential, "functional": functional, "subclassed": subclassed,
              "nested": nested}


def randomize(model, rng):
    """Random gamma/beta (so BN outputs matter downstream) and statistics far from the truth."""
    for layer in tracked_layers(model):
        if isinstance(layer, (kerasbn.BatchNormalization, keras.layers.BatchNormalization)):
            size = layer.moving_mean.shape[0]
            for variable, low, high in ((layer.gamma, 0.5, 2.0), (layer.beta, -1.0, 1.0),
                                        (layer.moving_mean, 5.0, 6.0),
                                        (layer.moving_variance, 7.0, 8.0)):
                if variable is not None:  # gamma/beta without scale/center
                    variable.assign(rng.uniform(low, high, size).astype("float32"))
    return model


def make_net(rng, kind="kerasbn_moving_average", topology="functional"):
    return randomize(TOPOLOGIES[topology](kind), rng)


def make_data(rng, n):
    return rng.normal(2.0, 3.0, (n, FEATURES)).astype("float32")


def snapshot(model):
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(model, before):
    after = model.get_weights()
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    # No layer's `call` was replaced on the instance, and no reporting scope is left open.
    assert all("call" not in layer.__dict__ for layer in tracked_layers(model))
    assert all(getattr(layer, "_batch_moments_report", None) is None
               for layer in tracked_layers(model))


# --- the estimate ----------------------------------------------------------------------------


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("kind", BN_KINDS)
def test_matches_float64_reference(rng, kind, topology):
    """Unequal batches (32, 32, 32, 4), dropout inactive, both BN classes, every topology
    (Keras's layer where a graph calls it: `test_keras_layer_outside_a_graph_is_refused`)."""
    if (kind, topology) == ("keras", "subclassed"):
        pytest.skip("Keras's layer called from a subclassed model's code is refused")
    model = make_net(rng, kind, topology)
    x = make_data(rng, 100)
    report = kerasbn.population_statistics(model, x, verbose=0)
    assert_statistics(model, dense_reference(model, split(x, 32)))
    assert report.layers == BN_NAMES
    assert (report.batches_used, report.samples_seen, report.batches_skipped) == (4, 100, 0)
    assert not report.steps_exceeded_data


def test_keras_layer_outside_a_graph_is_refused(rng):
    """A subclassed model calls its Keras BN layers from code no graph shows: the pass cannot
    run them in training mode alone, and says so before anything runs or changes."""
    model = make_net(rng, "keras", "subclassed")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Use kerasbn.BatchNormalization there .*Received: "
                       r"model 'subclassed_net.*' with keras.layers.BatchNormalization "
                       r"\['bn1', 'bn2'\] outside its graph"):
        kerasbn.population_statistics(model, make_data(rng, 8), verbose=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["kerasbn_moving_average", "keras"])
def test_without_gamma_and_beta(rng, kind):
    model = randomize(functional(kind, center=False, scale=False), rng)
    x = make_data(rng, 40)
    kerasbn.population_statistics(model, x, verbose=0)
    assert_statistics(model, dense_reference(model, split(x, 32)))


@pytest.mark.parametrize("kind,bn_kwargs", [
    ("keras", {"renorm": True}),
    ("kerasbn_moving_average", {"renorm": True}),
    ("kerasbn_population", {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}}),
    ("kerasbn_moving_average", {"virtual_batch_size": 4}),
], ids=["keras_renorm", "kerasbn_renorm", "kerasbn_population_renorm", "kerasbn_ghost"])
def test_renorm_and_ghost_batch_layers_get_plain_statistics(rng, kind, bn_kwargs):
    """Their inference is plain BN: the pass sets plain population statistics, and a renorm
    layer's moving_stddev to √(variance + ε), the value its next training step derives the
    variance from."""
    model = randomize(functional(kind, **bn_kwargs), rng)
    x = make_data(rng, 64)
    kerasbn.population_statistics(model, x, verbose=0)
    expected = dense_reference(model, split(x, 32))
    assert_statistics(model, expected)
    for name, (_, variance, _) in expected.items():
        layer = layers_by_name(model)[name]
        if bn_kwargs.get("renorm"):
            np.testing.assert_allclose(layer.moving_stddev.numpy(),
                                       np.sqrt(variance + layer.epsilon), rtol=RTOL)


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_layers_with_an_activation_pass_it_on(rng, activation):
    """Dense → BN(activation) → Dense → BN: the statistics are of each BN's input, and the
    second BN sees the first one's output after the activation (fused, or applied after)."""
    dense1, dense2 = keras.layers.Dense(HIDDEN), keras.layers.Dense(OUTPUTS)
    bn1 = kerasbn.BatchNormalization(activation=activation, name="bn1")
    bn2 = kerasbn.BatchNormalization(name="bn2")
    inputs = keras.Input((FEATURES,))
    model = randomize(keras.Model(inputs, bn2(dense2(bn1(dense1(inputs))))), rng)
    x = make_data(rng, 64)
    kerasbn.population_statistics(model, x, verbose=0)
    f = {"silu": lambda z: z / (1.0 + np.exp(-z)), "tanh": np.tanh}[activation]
    moments = {"bn1": [], "bn2": []}
    for batch in split(x, 32):
        h = np.asarray(batch, np.float64) @ dense1.kernel.numpy() + dense1.bias.numpy()
        h, batch_moments = bn_forward(bn1, h)
        moments["bn1"].append(batch_moments)
        h = f(h) @ dense2.kernel.numpy() + dense2.bias.numpy()
        moments["bn2"].append(bn_forward(bn2, h)[1])
    assert_statistics(model, {name: pooled(m) for name, m in moments.items()})


@pytest.mark.parametrize("dtype", ["float64", "uint8"])
def test_dtypes_as_the_layer_computes_them(rng, dtype):
    """A float64 model keeps float64 statistics; uint8 inputs are computed in float32."""
    policy = "float64" if dtype == "float64" else None
    inputs = keras.Input((4, 4, 2), dtype=dtype)
    bn = kerasbn.BatchNormalization(dtype=policy)
    model = keras.Model(inputs, bn(inputs))
    x = rng.integers(0, 256, (20, 4, 4, 2)).astype(dtype)
    kerasbn.population_statistics(model, x, batch_size=10, verbose=0)
    assert bn.moving_mean.dtype == (dtype if dtype == "float64" else "float32")
    moments = [reference.moments(b, (3,)) for b in split(x, 10)]
    mean, variance, _ = pooled([squeeze(m) for m in moments])
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=rtol)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=rtol)


def test_equal_batches_give_the_papers_formula(rng):
    """E_B[μ_B] and m/(m−1)·E_B[σ²_B], computed here without the pooled form."""
    model = make_net(rng)
    x = make_data(rng, 96)
    kerasbn.population_statistics(model, x, batch_size=24, verbose=0)
    layer = layers_by_name(model)["bn1"]
    dense1 = layers_by_name(model)["dense1"].get_weights()
    h = [np.asarray(b, np.float64) @ dense1[0] + dense1[1] for b in split(x, 24)]
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean([b.mean(0) for b in h], 0),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               24 / 23 * np.mean([b.var(0) for b in h], 0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "kind, axis", [("kerasbn_population", -1), ("keras", -1), ("kerasbn_population", 1)]
)
def test_conv_statistics_count_every_position(rng, kind, axis):
    """m = N·H·W per batch for a conv feature map, channels last or (axis=1) first."""
    inputs = keras.Input((5, 4, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
    features = conv(inputs)
    if axis == 1:
        features = keras.layers.Permute((3, 1, 2))(features)
    model = keras.Model(inputs, make_bn(kind, "bn", axis=axis)(features))
    x = rng.normal(1.0, 2.0, (20, 5, 4, 3)).astype("float32")
    kerasbn.population_statistics(model, x, batch_size=8, verbose=0)
    features = keras.Model(inputs, conv.output).predict(x, verbose=0)
    moments = [squeeze(reference.moments(b, (3,))) for b in split(features, 8)]
    assert_statistics(model, {"bn": pooled(moments)})
    assert pooled(moments)[2][0] == 20 * 5 * 4


def test_large_feature_maps_take_the_compiled_kernel(rng):
    """Batches of 512 KiB per BN input run the kernel's own XLA cluster (blockwise sums), for
    kerasbn's layer and Keras's; the second BN sees the first one's training-mode output."""
    inputs = keras.Input((32, 32, 8))
    first = make_bn("kerasbn_population", "bn1")
    second = make_bn("keras", "bn2")
    model = randomize(keras.Model(inputs, second(first(inputs))), rng)
    x = rng.normal(3.0, 2.0, (40, 32, 32, 8)).astype("float32")
    kerasbn.population_statistics(model, x, batch_size=16, verbose=0)
    moments = {"bn1": [], "bn2": []}
    for batch in split(x, 16):
        y, *batch_moments = reference.forward(batch, first.gamma.numpy(), first.beta.numpy(),
                                              (3,), first.epsilon)
        moments["bn1"].append(squeeze(batch_moments))
        moments["bn2"].append(squeeze(reference.moments(y, (3,))))
    assert_statistics(model, {name: pooled(m) for name, m in moments.items()})


def test_shared_layer_pools_every_call(rng):
    """A BN layer applied twice per forward pass sees both inputs as batches."""
    a, b = keras.Input((FEATURES,)), keras.Input((FEATURES,))
    shared = kerasbn.BatchNormalization(statistics="population", name="bn")
    model = keras.Model([a, b], [shared(a), shared(b)])
    xa, xb = make_data(rng, 16), 3.0 * make_data(rng, 16)
    kerasbn.population_statistics(model, [xa, xb], batch_size=8, verbose=0)
    moments = [squeeze(reference.moments(x, (1,))) for pair in zip(split(xa, 8), split(xb, 8),
                                                                      strict=True) for x in pair]
    assert_statistics(model, {"bn": pooled(moments)})


def test_mixed_precision(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = make_net(rng, "keras")
    x = make_data(rng, 64)
    kerasbn.population_statistics(model, x, verbose=0)
    for name, (mean, variance, _) in dense_reference(model, split(x, 32)).items():
        layer = layers_by_name(model)[name]
        assert layer.moving_mean.dtype == "float32"
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=2e-2)


def single_bn_model(*layers, name="bn"):
    inputs = keras.Input((FEATURES,))
    x = inputs
    for layer in (*layers, kerasbn.BatchNormalization(statistics="population", name=name)):
        x = layer(x)
    return keras.Model(inputs, x)


def test_dropout_stays_inactive(rng):
    model = single_bn_model(keras.layers.Dropout(0.9), keras.layers.GaussianNoise(1.0))
    x = make_data(rng, 32)
    kerasbn.population_statistics(model, x, verbose=0)
    assert_statistics(model, {"bn": pooled([squeeze(reference.moments(x, (1,)))])})


def test_large_mean_small_spread_stays_accurate(rng):
    """|μ| ≫ σ, where E[x²] − E[x]² would lose every digit in float32."""
    model = single_bn_model()
    x = (1e4 + 0.1 * rng.normal(size=(256, FEATURES))).astype("float32")
    kerasbn.population_statistics(model, x, batch_size=64, verbose=0)
    mean, variance, _ = pooled([squeeze(reference.moments(b, (1,))) for b in split(x, 64)])
    layer = layers_by_name(model)["bn"]
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=0, atol=2e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-3)


def test_population_mode_continues_the_estimate_in_training(rng):
    """After the pass, population_count/dof are the pass's: a training batch pools with it."""
    model = single_bn_model()
    layer = layers_by_name(model)["bn"]
    x, extra = make_data(rng, 50), make_data(rng, 10)
    kerasbn.population_statistics(model, x, batch_size=25, verbose=0)
    np.testing.assert_array_equal(layer.population_dof.numpy(), np.full(FEATURES, 48.0))
    layer(extra, training=True)
    moments = [squeeze(reference.moments(b, (1,))) for b in [*split(x, 25), extra]]
    assert_statistics(model, {"bn": pooled(moments)})


def test_masked_positions_are_not_counted(rng):
    inputs = keras.Input((5,), dtype="int32")
    embed = keras.layers.Embedding(10, 3, mask_zero=True, name="embed")
    model = keras.Model(inputs, kerasbn.BatchNormalization(name="bn")(embed(inputs)))
    tokens = rng.integers(0, 10, (12, 5)).astype("int32")
    kerasbn.population_statistics(model, tokens, batch_size=6, verbose=0)
    vectors = embed.embeddings.numpy()[tokens]
    weights = (tokens != 0)[..., None]
    moments = [squeeze(reference.moments(v, (2,), w))
               for v, w in zip(split(vectors, 6), split(weights, 6), strict=True)]
    assert_statistics(model, {"bn": pooled(moments)})


def test_frozen_layers_are_left_alone(rng):
    model = make_net(rng)
    bn1 = layers_by_name(model)["bn1"]
    bn1.trainable = False
    before = bn1.moving_mean.numpy().copy()
    report = kerasbn.population_statistics(model, make_data(rng, 40), verbose=0)
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), before)
    assert report.layers == ("bn2",) and report.frozen_layers == ("bn1",)


class WithSpareLayer(SubclassedNet):
    def __init__(self, kind):
        super().__init__(kind)
        self.spare = make_bn(kind, "spare")


def test_layers_not_reached_are_left_alone(rng):
    model = WithSpareLayer("kerasbn_moving_average")
    model.spare.build((None, 3))
    model(make_data(rng, 2))
    randomize(model, rng)
    model.spare.moving_mean.assign(np.zeros(3))
    report = kerasbn.population_statistics(model, make_data(rng, 40), verbose=0)
    np.testing.assert_array_equal(model.spare.moving_mean.numpy(), np.zeros(3))
    assert report.layers == BN_NAMES and report.unreached_layers == ("spare",)
    assert "Left unreached layers unchanged: spare." in str(report)


def test_steps_limit_and_steps_beyond_the_data(rng):
    model = make_net(rng)
    x = make_data(rng, 100)
    report = kerasbn.population_statistics(model, x, steps=2, verbose=0)
    assert_statistics(model, dense_reference(model, split(x, 32)[:2]))
    assert (report.batches_used, report.steps_exceeded_data) == (2, False)
    report = kerasbn.population_statistics(model, x, steps=9, verbose=0)
    assert_statistics(model, dense_reference(model, split(x, 32)))
    assert (report.batches_used, report.steps_exceeded_data) == (4, True)
    assert "exceeded" in str(report)


def test_non_finite_batch_is_skipped_and_reported(rng):
    model = make_net(rng)
    good = [make_data(rng, 16) for _ in range(3)]
    bad = make_data(rng, 16)
    bad[3, 2] = np.nan
    report = kerasbn.population_statistics(model, iter([good[0], bad, good[1], good[2]]),
                                           verbose=0)
    assert_statistics(model, dense_reference(model, good))
    assert (report.batches_used, report.batches_skipped, report.samples_seen) == (3, 1, 48)
    assert "Skipped 1 batch" in str(report)


def test_progress_bar_and_report_text(rng, capsys):
    model = make_net(rng)
    report = kerasbn.population_statistics(model, make_data(rng, 64), verbose="auto")
    assert "2/2" in capsys.readouterr().out
    assert str(report).startswith("Population statistics set for 2 BatchNormalization layer(s)")


# --- input kinds -----------------------------------------------------------------------------


class Batches(keras.utils.PyDataset):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def as_kind(kind, batches):
    """The same batches as each kind of data, with targets or sample weights alongside."""
    labelled = [(x, np.zeros(len(x)), np.ones(len(x))) for x in batches]
    if kind == "dataset":
        return tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).map(
            lambda x: (x, 0.0)).batch(len(batches[0]))
    if kind == "generator":
        return (b[:2] for b in labelled)
    if kind == "bare_generator":
        return iter(batches)
    return Batches(labelled)


@pytest.mark.parametrize("kind", ["dataset", "generator", "bare_generator", "pydataset"])
def test_input_kinds(rng, kind):
    model = make_net(rng)
    batches = split(make_data(rng, 40), 16)
    report = kerasbn.population_statistics(model, as_kind(kind, batches), verbose=0)
    assert_statistics(model, dense_reference(model, batches))
    assert (report.batches_used, report.samples_seen) == (3, 40)


class ArrayLike:
    """Neither a NumPy array nor a tensor, but convertible to one (as pandas, JAX arrays are)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


@pytest.mark.parametrize("kind", ["tensor", "array_like"])
def test_array_kinds(rng, kind):
    model = make_net(rng)
    x = make_data(rng, 40)
    data = tf.constant(x) if kind == "tensor" else ArrayLike(x)
    report = kerasbn.population_statistics(model, data, batch_size=16, verbose=0)
    assert_statistics(model, dense_reference(model, split(x, 16)))
    assert (report.batches_used, report.samples_seen) == (3, 40)


def test_arrays_of_different_lengths_are_refused(rng):
    model = two_input_model()
    before = snapshot(model)
    x = make_data(rng, 30)
    with pytest.raises(ValueError, match=r"Received: arrays of lengths \[20, 30\]"):
        kerasbn.population_statistics(model, [x[:20, :2], x[:, 2:]], verbose=0)
    assert_unchanged(model, before)


def two_input_model():
    a, b = keras.Input((2,), name="a"), keras.Input((FEATURES - 2,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], kerasbn.BatchNormalization(name="bn")(joined))


@pytest.mark.parametrize("kind", ["list", "dict", "dataset", "generator"])
def test_multi_input_models(rng, kind):
    model = two_input_model()
    x = make_data(rng, 30)
    parts = [x[:, :2], x[:, 2:]]
    data = {
        "list": parts,
        "dict": {"a": parts[0], "b": parts[1]},
        "dataset": tf.data.Dataset.from_tensor_slices((tuple(parts), x[:, 0])).batch(10),
        "generator": ((tuple(p[i : i + 10] for p in parts), None) for i in range(0, 30, 10)),
    }[kind]
    kerasbn.population_statistics(model, data, batch_size=10 if kind in ("list", "dict") else None,
                                  verbose=0)
    moments = [squeeze(reference.moments(b, (1,))) for b in split(x, 10)]
    assert_statistics(model, {"bn": pooled(moments)})


# --- atomicity -------------------------------------------------------------------------------


def failing_batches(rng, error):
    yield make_data(rng, 16)
    yield make_data(rng, 16)
    raise error


@pytest.mark.parametrize("error", [RuntimeError("disk gone"), KeyboardInterrupt()])
def test_interrupted_pass_changes_nothing(rng, error):
    model = make_net(rng, "kerasbn_population")
    before = snapshot(model)
    with pytest.raises(type(error)):
        kerasbn.population_statistics(model, failing_batches(rng, error), verbose=0)
    assert_unchanged(model, before)
    # And the model is fine for the next pass.
    x = make_data(rng, 32)
    kerasbn.population_statistics(model, x, verbose=0)
    assert_statistics(model, dense_reference(model, [x]))


def test_bad_batch_mid_pass_changes_nothing(rng):
    model = make_net(rng)
    before = snapshot(model)
    batches = iter([make_data(rng, 8), rng.normal(size=(8, FEATURES + 1)).astype("float32")])
    with pytest.raises(ValueError, match=r"batch 1 differs. Received: inputs of shape \(8, 7\) "
                       r"in batch 1, \(8, 6\) in batch 0"):
        kerasbn.population_statistics(model, batches, verbose=0)
    assert_unchanged(model, before)


def test_later_batch_of_another_spatial_size_is_refused(rng):
    """A fully convolutional model runs on any spatial size; the traced step would average a
    16x16 batch into statistics of 8x8 ones. Refused before it runs, nothing written."""
    model = keras.Sequential([keras.Input((None, None, 2)), keras.layers.Conv2D(3, 3),
                              kerasbn.BatchNormalization()])
    before = snapshot(model)
    batches = [rng.normal(size=(4, 8, 8, 2)), rng.normal(size=(4, 8, 8, 2)),
               rng.normal(size=(4, 16, 16, 2))]
    with pytest.raises(ValueError, match=r"batch 2 differs. Received: inputs of shape "
                       r"\(4, 16, 16, 2\) in batch 2, \(4, 8, 8, 2\) in batch 0"):
        kerasbn.population_statistics(model, iter(batches), verbose=0)
    assert_unchanged(model, before)


def test_first_batch_must_fit_the_declared_input(rng):
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 3),
                              keras.layers.GlobalAveragePooling2D(), kerasbn.BatchNormalization()])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"takes inputs of shape \(None, 8, 8, 2\)\n"
                       r"Received: inputs of shape \(4, 12, 12, 2\)"):
        kerasbn.population_statistics(model, rng.normal(size=(4, 12, 12, 2)), verbose=0)
    assert_unchanged(model, before)


def test_batches_with_one_value_per_channel_are_reported_as_such(rng):
    model = make_net(rng)
    batches = [make_data(rng, 16), make_data(rng, 1), make_data(rng, 16)]
    bad = make_data(rng, 16)
    bad[0, 0] = np.nan
    report = kerasbn.population_statistics(model, iter([*batches, bad]), verbose=0)
    assert (report.batches_used, report.batches_skipped, report.batches_too_small) == (2, 2, 1)
    assert "Skipped 2 batch(es): 1 with fewer than 2 values per channel (m < 2)" in str(report)
    assert "1 with non-finite statistics" in str(report)
    with pytest.raises(ValueError, match=r"1 with fewer than 2 values per channel.*"
                       r"Received: 1 batch"):
        kerasbn.population_statistics(model, iter([make_data(rng, 1)]), verbose=0)


def test_data_none_is_refused(rng):
    with pytest.raises(TypeError, match="Received: data=None"):
        kerasbn.population_statistics(make_net(rng), None)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 1.5, True, "2"])
def test_bad_steps(rng, steps):
    with pytest.raises(ValueError, match=f"Received: steps={steps!r}"):
        kerasbn.population_statistics(make_net(rng), make_data(rng, 8), steps=steps)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"verbose": 3}, ValueError, "Received: verbose=3"),
        ({"batch_size": 0}, ValueError, "Received: batch_size=0"),
        ({"data": make_data(np.random.default_rng(0), 0)}, ValueError,
         "yielded no batch. Received: data of type ndarray"),
        ({"data": tf.data.Dataset.from_tensor_slices(np.zeros((0, FEATURES))).batch(4)},
         ValueError, "yielded no batch. Received: data of type _BatchDataset"),
        ({"data": iter([])}, ValueError, "yielded no batch. Received: data of type list_iterator"),
        ({"data": np.zeros((8, FEATURES + 2), "float32")}, ValueError,
         r"does not fit the model .*\nReceived: inputs of shape \(8, 8\)"),
        ({"data": tf.data.Dataset.from_tensors(np.zeros((4, FEATURES))).batch(2), "batch_size": 4},
         ValueError, "Received: batch_size=4 with data of type"),
        ({"data": tf.data.Dataset.from_tensors(np.zeros((4, FEATURES))).repeat()}, ValueError,
         "Received: steps=None with an infinite _RepeatDataset"),
        ({"data": "not data"}, TypeError, "Received: data of type str"),
        ({"data": iter([np.full((4, FEATURES), np.inf, "float32")])}, ValueError,
         "Received: 1 batch"),
    ],
    ids=["verbose", "batch_size", "empty_array", "empty_dataset", "empty_generator",
         "wrong_shape", "batch_size_with_dataset", "infinite", "wrong_type", "all_non_finite"],
)
def test_bad_input(rng, kwargs, error, message):
    model = make_net(rng)
    before = snapshot(model)
    kwargs = {"data": make_data(rng, 8), **kwargs}
    with pytest.raises(error, match=message):
        kerasbn.population_statistics(model, kwargs.pop("data"), **kwargs)
    assert_unchanged(model, before)


def test_model_without_batch_normalization(rng):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(2)], name="plain")
    with pytest.raises(ValueError, match="Received: model 'plain' with none"):
        kerasbn.population_statistics(model, make_data(rng, 8))


def test_model_with_only_frozen_batch_normalization(rng):
    model = make_net(rng)
    model.trainable = False
    with pytest.raises(ValueError, match=r"with only frozen ones \(2\)"):
        kerasbn.population_statistics(model, make_data(rng, 8))


def test_unbuilt_model_and_not_a_model(rng):
    with pytest.raises(ValueError, match="Received: unbuilt model 'unbuilt'"):
        kerasbn.population_statistics(
            keras.Sequential(net_layers("keras"), name="unbuilt"), make_data(rng, 8))
    with pytest.raises(TypeError, match="Received: model of type <class 'str'>"):
        kerasbn.population_statistics("model", make_data(rng, 8))


# --- the callback ----------------------------------------------------------------------------


def compiled_net(rng):
    """A net whose moving averages lag far behind: momentum 0.99 and few steps."""
    model = make_net(rng)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def fresh_statistics(model, x):
    """The statistics a pass with the current weights gives (a pass is deterministic)."""
    kerasbn.population_statistics(model, x, verbose=0)
    return [layers_by_name(model)[n].moving_mean.numpy().copy() for n in BN_NAMES]


def current_means(model):
    return [layers_by_name(model)[n].moving_mean.numpy().copy() for n in BN_NAMES]


class RecordBeforeValidation(keras.callbacks.Callback):
    """Snapshots the statistics validation runs with, and what a fresh pass would give."""

    def __init__(self, x):
        super().__init__()
        self.x, self.seen, self.fresh = x, [], []

    def on_test_begin(self, logs=None):
        self.seen.append(current_means(self.model))
        self.fresh.append(fresh_statistics(self.model, self.x))


def test_callback_at_train_end_so_evaluate_uses_population_statistics(rng):
    model = compiled_net(rng)
    x, y = make_data(rng, 64), rng.normal(size=(64, OUTPUTS)).astype("float32")
    callback = kerasbn.PopulationStatistics(x)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert len(callback.reports) == 1
    assert_statistics(model, dense_reference(model, split(x, 32)))
    loss = model.evaluate(x, y, verbose=0, callbacks=[callback])
    assert len(callback.reports) == 1  # a standalone evaluate does not run a pass
    prediction = model.predict(x, verbose=0)
    np.testing.assert_allclose(loss, np.mean((prediction - y) ** 2), rtol=1e-4)


def test_callback_every_n_epochs_runs_before_validation(rng):
    model = compiled_net(rng)
    x, y = make_data(rng, 64), rng.normal(size=(64, OUTPUTS)).astype("float32")
    callback = kerasbn.PopulationStatistics(x, every_n_epochs=2)
    recorder = RecordBeforeValidation(x)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, validation_data=(x, y),
              callbacks=[callback, recorder])
    # Passes after epochs 2 (before its validation) and at the end (epoch 3 trained since).
    assert len(callback.reports) == 2
    for seen, fresh in zip(recorder.seen[1], recorder.fresh[1], strict=True):
        np.testing.assert_allclose(seen, fresh, rtol=1e-6)
    # Epoch 1 validated with the lagging moving averages.
    assert not np.allclose(recorder.seen[0][0], recorder.fresh[0][0], rtol=1e-2)


def test_callback_without_validation_runs_at_epoch_end(rng):
    model = compiled_net(rng)
    x, y = make_data(rng, 32), rng.normal(size=(32, OUTPUTS)).astype("float32")
    callback = kerasbn.PopulationStatistics(x, steps=1, every_n_epochs=1)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    # One pass per epoch; none repeated at the end, which follows epoch 2's pass directly.
    assert [r.batches_used for r in callback.reports] == [1, 1]


class RecordAtEpochEnd(keras.callbacks.Callback):
    """The statistics after each epoch (placed after PopulationStatistics: after its pass)."""

    def __init__(self):
        super().__init__()
        self.means = []

    def on_epoch_end(self, epoch, logs=None):
        self.means.append(current_means(self.model))


@pytest.mark.parametrize("every_n_epochs", [None, 1])
def test_callback_with_ema_weights_estimates_for_the_final_weights(rng, every_n_epochs):
    """use_ema=True: fit swaps the weights' moving averages in after the last epoch, before
    on_train_end; the statistics left are those a fresh pass gives for the final (EMA)
    weights, even right after an every-epoch pass on the training weights."""
    model = make_net(rng)
    model.compile(optimizer=keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.5),
                  loss="mse")
    x, y = make_data(rng, 64), rng.normal(size=(64, OUTPUTS)).astype("float32")
    callback = kerasbn.PopulationStatistics(x, every_n_epochs=every_n_epochs)
    recorder = RecordAtEpochEnd()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback, recorder])
    left = current_means(model)
    for a, b in zip(left, fresh_statistics(model, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert len(callback.reports) == (1 if every_n_epochs is None else 3)
    if every_n_epochs:
        # The premise: the epoch-2 pass (training weights) differs from the final statistics.
        assert not np.allclose(recorder.means[-1][0], left[0], rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_epochs": 0}, "Received: every_n_epochs=0"),
        ({"steps": -1}, "Received: steps=-1"),
        ({"data": (b for b in []), "every_n_epochs": 2}, "Received: a generator with"),
    ],
)
def test_callback_bad_arguments(rng, kwargs, message):
    kwargs = {"data": make_data(rng, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        kerasbn.PopulationStatistics(**kwargs)
