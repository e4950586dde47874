"""Resumable classifier training: the checkpoints of linear evaluation and fine-tuning.

OUTPUT_DIR/checkpoints holds ``ckpt-N`` (N = the classifier optimizer's
step): the whole classifier (backbone included), its optimizers and the
position in the data (epoch, batch of that epoch). As in training
(co2_tf.run.callbacks), one is written every `checkpoint_every` steps, at every
epoch end and when SIGTERM or SIGINT arrives (then `Preempted` is raised:
exit 143 / 130). Rerunning the same command restores the newest intact one
(co2_tf.run.checkpoints) and goes on from that batch with the very batches an
uninterrupted run would have seen.

``checkpoints/evaluation.json`` records what is trained: the backbone's
source, the data and every flag that changes the result. An output dir
holding checkpoints of something else is refused with one line, rather than
restored into another backbone or schedule.
"""

import json

import tensorflow as tf

from co2_tf import io
from co2_tf.errors import UserError
from co2_tf.run import checkpoints
from co2_tf.run.callbacks import CheckpointCallback
from co2_tf.run.preemption import Preempted, PreemptionWatcher

CHECKPOINT_SUBDIR = "checkpoints"
KEY_FILE = "evaluation.json"
KEEP = 2
# Flags that may differ between a run and its resumption: where and how it runs, and how
# the backbone was named (what it resolved to, the key's "backbone", must be the same).
NOT_IN_KEY = ("output_dir", "strategy", "tpu", "cpu_devices", "eval_every", "checkpoint_every",
              "cache_features", "model_dir", "checkpoint", "keras_model")


def key_of(config, loaded, d):
    """What a resumed run must share with the run that wrote the checkpoints (JSON values)."""
    flags = {name: value for name, value in vars(config).items() if name not in NOT_IN_KEY}
    return json.loads(json.dumps({"backbone": loaded.as_dict(), "data": d.as_dict(),
                                  "flags": flags}, sort_keys=True))


def _differences(saved, now, prefix=""):
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return [] if saved == now else [f"{prefix[:-1]}: {saved!r} there, {now!r} now"]
    return [d for name in sorted(set(saved) | set(now))
            for d in _differences(saved.get(name), now.get(name), f"{prefix}{name}.")]


class ClassifierCheckpoint(CheckpointCallback):
    """Training's CheckpointCallback at the optimizer's step, recording the data position.

    A SIGTERM/SIGINT raises Preempted at once after its checkpoint (no
    held-out evaluation first: a preemption notice leaves seconds).
    """

    def __init__(self, manager, every_steps, preemption, position):
        super().__init__(manager, every_steps, preemption)
        self.position = position  # int64 [epoch, batches done in it]
        self._epoch = 0
        self._skipped = 0

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def start_epoch(self, epoch, skipped):
        self._epoch, self._skipped = epoch, skipped

    def on_train_batch_end(self, batch, logs=None):
        # The epoch's last batch (when Keras knows the count) is the next epoch's start.
        last = batch + 1 == (self.params or {}).get("steps")
        self.position.assign([self._epoch + 1, 0] if last
                             else [self._epoch, self._skipped + batch + 1])
        super().on_train_batch_end(batch, logs)
        self._raise_if_preempted()

    def on_epoch_end(self, epoch, logs=None):
        self.position.assign([epoch + 1, 0])
        super().on_epoch_end(epoch, logs)

    def on_test_batch_end(self, batch, logs=None):
        if self.preemption.requested:
            # Evaluating: the epoch's training is done, resume at the next one.
            epoch, done = (int(v) for v in self.position.numpy())
            if done:
                self.position.assign([epoch + 1, 0])
                self.last_saved_step = None  # rewrite this step's checkpoint with it
            self.save(self._step())
            self.preempted_at = self._step()
        self._raise_if_preempted()

    def _raise_if_preempted(self):
        if self.preempted_at is not None:
            raise Preempted(self.preempted_at, self.preemption.signum)


class Resumable:
    """The checkpoints of one evaluation's classifier training, in out/checkpoints.

    `objects`: what to checkpoint (name -> trackable: the model and its
    optimizers, built). Restores the newest checkpoint at construction;
    `epoch`, `skip` say where training goes on. Use as a context manager
    around the training: it watches SIGTERM/SIGINT.
    """

    def __init__(self, out, key, every_steps, **objects):
        self.directory = io.join(out, CHECKPOINT_SUBDIR)
        key_path = io.join(self.directory, KEY_FILE)
        found, _ = checkpoints.candidates(self.directory)
        if found or io.exists(key_path):
            saved = io.read_json(key_path) if io.exists(key_path) else {}
            diffs = _differences(saved, key)
            if diffs:
                raise UserError(
                    f"{out} holds checkpoints of another evaluation ({'; '.join(diffs[:3])}"
                    f"{'; ...' if len(diffs) > 3 else ''}): rerun with the same model and "
                    f"flags to resume, pass a new --output_dir, or delete {self.directory} "
                    "to start over")
        self.position = tf.Variable([0, 0], dtype=tf.int64, trainable=False)

        def make(with_step=True):
            return tf.train.Checkpoint(position=self.position, **objects)
        restored, recovered = checkpoints.restore_newest(make, self.directory, out)
        if recovered:
            checkpoints.rewrite_state(self.directory, recovered)
        if not io.exists(key_path):
            io.write_json_atomic(key_path, key)
        self.restored = restored
        self.manager = tf.train.CheckpointManager(make(), self.directory, max_to_keep=KEEP)
        self.every_steps = every_steps
        self.callback = None

    @property
    def epoch(self):
        return int(self.position[0])

    @property
    def skip(self):
        return int(self.position[1])

    def __enter__(self):
        self._watcher = PreemptionWatcher().__enter__()
        self.callback = ClassifierCheckpoint(self.manager, self.every_steps, self._watcher,
                                             self.position)
        return self

    def __exit__(self, *exc):
        return self._watcher.__exit__(*exc)
