"""End to end: train a BN convnet on digits, set population statistics, fold BN, export to ONNX.

    1. train a small convnet with `kerasbn.BatchNormalization` (moving-average statistics);
    2. test accuracy with those moving averages;
    3. `kerasbn.population_statistics(model, x_train)`: the paper's Algorithm 2, one pass over
       the training set with the final weights; test accuracy again;
    4. `kerasbn.export.to_onnx(model, path)`: fold every BN into the layer before it, convert
       with tf2onnx, verify with ONNX Runtime against the original model, write the file;
    5. compare Keras and ONNX Runtime on the whole test set: accuracy, largest difference,
       latency;
    6. `to_onnx(model, path, quantize="int8", calibration=x_train)`: the same, then quantized
       to int8 by ONNX Runtime (calibrated on 256 training images), verified against the
       float Keras model; its accuracy, size and latency join the table.

Offline (scikit-learn's bundled digits); `make demo` runs it, in about a minute on 2 CPU cores.

    python examples/convnet_export.py [--epochs 10] [--out out/]
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import statistics
import time
from pathlib import Path

import _data
import keras
import numpy as np

import kerasbn
import kerasbn.export

ONNX_NAME = "digits_convnet.onnx"
INT8_NAME = "digits_convnet_int8.onnx"


def build_convnet(input_shape, *, seed: int = 0) -> keras.Model:
    """Conv → BN → ReLU three times, DepthwiseConv → BN → ReLU, global average pooling,
    Dense → BN → ReLU, softmax.

    The layers before BN have no bias (BN's beta replaces it); every BN can be folded into
    the layer before it for inference. tf2onnx merges the Conv2D ones itself, not the depthwise
    and Dense ones, which is what makes folding matter for int8 (see `kerasbn.export.quantize`).
    """
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, (filters, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                kernel_initializer=keras.initializers.HeNormal(seed + i),
                                name=f"conv{i}")(h)
        h = kerasbn.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise",
                                     depthwise_initializer=keras.initializers.HeNormal(seed + 6))(h)
    h = kerasbn.BatchNormalization(name="bn_depthwise")(h)
    h = keras.layers.ReLU(name="relu_depthwise")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dense(64, use_bias=False, name="dense",
                           kernel_initializer=keras.initializers.HeNormal(seed + 4))(h)
    h = kerasbn.BatchNormalization(name="bn4")(h)
    h = keras.layers.ReLU(name="relu4")(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="softmax",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed + 5))(h)
    return keras.Model(inputs, outputs, name="digits_convnet")


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` after two warm-up calls."""
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="training batch size, also the population pass's m (default 32)")
    parser.add_argument("--learning-rate", type=float, default=0.05,
                        help="SGD (momentum 0.9) learning rate (default 0.05)")
    parser.add_argument("--dataset", choices=_data.DATASETS, default="digits",
                        help="digits (bundled, offline; default) or mnist (downloads)")
    parser.add_argument("--latency-batch", type=int, default=128,
                        help="batch size for the latency comparison (default 128)")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help=f"where {ONNX_NAME} goes (default out/)")
    parser.add_argument("--quick", action="store_true",
                        help="one epoch and few latency repeats, to check that everything runs")
    args = parser.parse_args(argv)
    if min(args.epochs, args.batch_size, args.latency_batch) < 1 or args.learning_rate <= 0:
        parser.error("--epochs, --batch-size, --latency-batch and --learning-rate must be "
                     f"positive. Received: {args.epochs}, {args.batch_size}, "
                     f"{args.latency_batch}, {args.learning_rate}")
    if args.quick:
        args.epochs = 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = _data.load(args.dataset)
    x_test, y_test = data.x_test, data.y_test
    print(f"Data: {data.describe()}")

    keras.utils.set_random_seed(0)
    model = build_convnet(data.input_shape)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"\n1. Training {model.name} ({model.count_params():,} parameters, 5 BN layers), "
          f"{args.epochs} epochs of batch {args.batch_size}")
    start = time.perf_counter()
    model.fit(data.x_train, data.y_train, batch_size=args.batch_size, epochs=args.epochs,
              shuffle=True, verbose=1)
    train_seconds = time.perf_counter() - start

    accuracy_moving = _data.accuracy(model, x_test, y_test)
    print(f"\n2. Test accuracy with moving-average statistics: {accuracy_moving:.4f}")

    print("\n3. Population statistics (the paper's Algorithm 2) over the training set")
    population = kerasbn.population_statistics(model, data.x_train, batch_size=args.batch_size)
    print(population)
    keras_probabilities = model.predict(x_test, batch_size=256, verbose=0)
    accuracy_population = float(np.mean(keras_probabilities.argmax(-1) == y_test))
    print(f"Test accuracy with population statistics: {accuracy_population:.4f}")

    print("\n4. Fold BN and export to ONNX, verified with ONNX Runtime")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ONNX_NAME
    export = kerasbn.export.to_onnx(model, path, samples=x_test[:64])
    print(export)

    print("\n5. Keras vs ONNX Runtime on the test set")
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name

    def run_onnx(x):
        return session.run(None, {input_name: x})[0]

    onnx_probabilities = run_onnx(x_test)
    accuracy_onnx = float(np.mean(onnx_probabilities.argmax(-1) == y_test))
    max_error = float(np.max(np.abs(onnx_probabilities - keras_probabilities)))
    disagreements = int(np.sum(onnx_probabilities.argmax(-1) != keras_probabilities.argmax(-1)))

    print("\n6. The same, quantized to int8 (calibrated on training images), verified on the "
          "test set against the float Keras model")
    int8_path = args.out / INT8_NAME
    int8 = kerasbn.export.to_onnx(model, int8_path, quantize="int8", calibration=data.x_train,
                                  samples=x_test)
    print(int8)
    int8_session = onnx_session(int8_path)

    def run_int8(x):
        return int8_session.run(None, {input_name: x})[0]

    int8_probabilities = run_int8(x_test)
    accuracy_int8 = float(np.mean(int8_probabilities.argmax(-1) == y_test))
    int8_disagreements = int(
        np.sum(int8_probabilities.argmax(-1) != keras_probabilities.argmax(-1))
    )

    batch = x_test[: args.latency_batch]
    repeats = 5 if args.quick else 50
    latency = {
        (name, len(x)): median_seconds(run, repeats)
        for x in (batch, x_test[:1])
        for name, run in (("keras", lambda x=x: model.predict_on_batch(x)),
                          ("onnx", lambda x=x: run_onnx(x)),
                          ("int8", lambda x=x: run_int8(x)))
    }
    folds = export.fold
    rows = [
        ("test accuracy, Keras (population statistics)", f"{accuracy_population:.4f}"),
        ("test accuracy, ONNX Runtime (folded)", f"{accuracy_onnx:.4f}"),
        ("test accuracy, ONNX Runtime int8 (folded, quantized)", f"{accuracy_int8:.4f}"),
        ("predictions that differ from Keras: float32 / int8",
         f"{disagreements} / {int8_disagreements} of {len(y_test)}"),
        ("max |ONNX − Keras| (probabilities, test set)", f"{max_error:.2e}"),
        ("BN layers folded", f"{len(export.folded)} of {len(folds.records) if folds else 0}"),
        ("ONNX nodes (unfolded export)",
         f"{export.node_count} ({export.unfolded_node_count or '-'})"),
        ("ONNX file size: float32 / int8",
         f"{export.file_size / 1000:.1f} kB / {int8.file_size / 1000:.1f} kB"),
        ("int8: Conv/Gemm/MatMul quantized, multiply-adds left",
         f"{sum(int8.quantization.structure.quantized.values())} of "
         f"{sum(int8.quantization.structure.totals.values())}, "
         f"{int8.quantization.structure.multiply_adds}"),
    ]
    for size in (len(batch), 1):
        keras_ms, onnx_ms, int8_ms = (latency[name, size] * 1e3 for name in ("keras", "onnx",
                                                                             "int8"))
        rows.append((f"latency, batch of {size}: ONNX int8 / ONNX float32 / Keras predict",
                     f"{int8_ms:.2f} / {onnx_ms:.2f} / {keras_ms:.2f} ms"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"\nTraining took {train_seconds:.0f} s. Wrote {path} and {int8_path}")
    return {
        "accuracy_moving_average": accuracy_moving,
        "accuracy_population": accuracy_population,
        "accuracy_onnx": accuracy_onnx,
        "max_error": max_error,
        "disagreements": disagreements,
        "population": population,
        "export": export,
        "latency": latency,
        "onnx_path": path,
        "accuracy_int8": accuracy_int8,
        "int8_disagreements": int8_disagreements,
        "int8": int8,
        "int8_path": int8_path,
    }


if __name__ == "__main__":
    main()
