"""The global step: read from the device once, then counted on the host.

A CO2Model's step is its `step_counter` (every step, skipped ones included:
co2_tf.method.model), else the optimizer's `iterations`. The callbacks read it
once per fit() call and count on from what Keras tells them (no device read
per step).
"""


def read_step(model):
    """The model's global step, read from the device: its `step_counter`
    (co2_tf.method.model.CO2Model) or its optimizer's `iterations`."""
    counter = getattr(model, "step_counter", None)
    if counter is None:
        counter = model.optimizer.iterations
    return int(counter.numpy())


class HostStep:
    """The global step, counted on the host: no device read per step.

    Read from the model once per fit() call (`start`, in on_train_begin),
    then advanced from what Keras tells the callbacks: the epoch's first step
    (`epoch`, in on_epoch_begin) and each execution's step indices within
    the epoch. With --steps_per_execution=k Keras announces executions of k
    steps; the last one of an epoch may run fewer (its data ends), so the
    count is capped at the epoch's steps.
    """

    def __init__(self):
        self.value = None
        self._epoch_start = None

    def start(self, model):
        self.value = self._epoch_start = read_step(model)
        return self.value

    def epoch(self):
        self._epoch_start = self.value

    def _at(self, steps_done, params):
        steps = (params or {}).get("steps")
        return self._epoch_start + (min(steps_done, steps) if steps else steps_done)

    def execution_end(self, begin, steps_per_execution, params):
        """The step the execution starting at epoch index `begin` will end at."""
        return self._at(begin + steps_per_execution, params)

    def ended(self, end, params):
        """Call in on_train_batch_end(end): the step now (also kept as `value`)."""
        self.value = self._at(end + 1, params)
        return self.value
