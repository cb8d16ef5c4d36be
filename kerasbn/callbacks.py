"""Keras callbacks of kerasbn: `PopulationStatistics` runs Algorithm 2's pass during `fit`."""

from __future__ import annotations

import types

import keras

from kerasbn.population import (
    PopulationReport,
    check_batch_size,
    check_steps,
    check_verbose,
    is_positive_int,
    population_statistics,
)


class PopulationStatistics(keras.callbacks.Callback):
    """Runs `population_statistics(model, data, steps)` during `model.fit`.

    At the end of training, so that `model.evaluate`/`predict` after `fit` use population
    statistics; and with `every_n_epochs=n`, also at the end of every n-th epoch, *before* its
    validation (as detectron2's PreciseBN hook does), so the reported `val_` metrics of that
    epoch use them too. Keras validates inside the epoch, after the last training step, through
    `on_test_begin`: the pass runs there, or in `on_epoch_end` if the epoch has no validation.
    Put this callback before checkpointing callbacks so that they save the new statistics.
    With an optimizer using `use_ema=True`, fit ends by swapping the weights' moving averages in
    (before `on_train_end`): the final pass runs for those weights, even right after an
    `every_n_epochs` pass.

    Args:
        data: as for `population_statistics`; replayable (arrays, a `tf.data.Dataset`, a
            `PyDataset`) when it is used more than once. A generator is used up by one pass.
        steps: batches per pass, `None` for all of `data`.
        every_n_epochs: `None` (only at the end of training) or a positive integer.
        verbose: progress bar of each pass, 0 by default so as not to break fit's own.
        batch_size: for arrays, as in `population_statistics`.

    `reports` lists the `PopulationReport` of every pass.
    """

    def __init__(self, data, steps=None, every_n_epochs=None, *, verbose=0, batch_size=None):
        super().__init__()
        check_steps(steps)
        check_batch_size(batch_size)
        self._verbose = check_verbose(verbose)
        if every_n_epochs is not None and not is_positive_int(every_n_epochs):
            raise ValueError(
                "`every_n_epochs` must be a positive integer or None. Received: "
                f"every_n_epochs={every_n_epochs!r}"
            )
        if every_n_epochs is not None and isinstance(data, types.GeneratorType):
            raise ValueError(
                "A generator can be iterated only once, but `every_n_epochs` needs the data "
                "several times: pass arrays, a tf.data.Dataset or a keras.utils.PyDataset. "
                f"Received: a generator with every_n_epochs={every_n_epochs!r}"
            )
        self.data = data
        self.steps = steps
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.reports: list[PopulationReport] = []
        self._in_fit = False
        self._epoch = None
        self._pass_epoch = None  # epoch after whose training the last pass ran

    def _due(self, epoch):
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def _run_pass(self):
        self.reports.append(
            population_statistics(
                self.model, self.data, self.steps, self._verbose, batch_size=self.batch_size
            )
        )
        self._pass_epoch = self._epoch

    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._epoch = None
        self._pass_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_test_begin(self, logs=None):
        # Also called by a standalone evaluate(); only fit's validation is ours.
        if self._in_fit and self._epoch is not None and self._due(self._epoch):
            self._run_pass()

    def on_epoch_end(self, epoch, logs=None):
        if self._due(epoch) and self._pass_epoch != epoch:
            self._run_pass()

    def on_train_end(self, logs=None):
        self._in_fit = False
        # Skip a pass that would repeat the last one: no training step since, and no weight
        # swap. An optimizer with `use_ema=True` has just replaced the weights by their moving
        # averages (Keras's fit calls `finalize_variable_values` before `on_train_end`), so
        # the statistics must be those of the weights the model ends with.
        weights_swapped = bool(getattr(getattr(self.model, "optimizer", None), "use_ema", False))
        if self._pass_epoch is None or self._pass_epoch != self._epoch or weights_swapped:
            self._run_pass()
