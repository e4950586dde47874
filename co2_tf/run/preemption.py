"""Preemption: SIGTERM or SIGINT (Ctrl-C) becomes a checkpoint at a step end, then an exit.

`PreemptionWatcher` turns the signals into a flag that the checkpoint callback
(co2_tf.run.callbacks.CheckpointCallback) acts on at the end of an execution;
`any_worker` makes every worker of a multi-worker run stop at the same step;
`Preempted` is what the caller then raises (exit 143 or 130, as the shell's).
"""

import contextlib
import signal
import threading

import tensorflow as tf


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written.

    `exit_code` is the shell's code for the signal: 143 (SIGTERM), 130 (SIGINT).
    """

    def __init__(self, step, signum=signal.SIGTERM, by_another_worker=False):
        self.step = step
        self.exit_code = 128 + int(signum)
        cause = ("another worker was stopped" if by_another_worker
                 else f"stopped by {signal.Signals(signum).name}")
        super().__init__(f"{cause} at step {step}; checkpoint written, rerun the same command "
                         "to resume")


class PreemptionWatcher(contextlib.AbstractContextManager):
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the checkpoint callback acts on at a
    step end. After the first Ctrl-C, a second one aborts at once (the default handler)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # After a Ctrl-C, the user wants out: a second one still aborts at once.
            if not (signum == signal.SIGINT == self.signum):
                signal.signal(signum, previous)
        return False


def any_worker(strategy):
    """For a multi-worker run, flag -> whether any worker's flag is set; else None.

    One all-reduce of one float across the workers, run by every worker at
    the same execution end (CheckpointCallback calls it once per host call:
    every --steps_per_execution steps): a SIGTERM on one host then stops
    every host at the same step, each taking part in the save (a worker
    saving alone would wait forever for the others in the variables'
    collective reads). Its cost is one small collective's latency per
    execution, about a network round trip between hosts.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None
            or len(resolver.cluster_spec().as_dict().get("worker", [])) +
            len(resolver.cluster_spec().as_dict().get("chief", [])) < 2):
        return None

    def replica_fn(flag):
        # identity: a value of this replica (the bare argument has no replica device).
        return tf.distribute.get_replica_context().all_reduce("sum", tf.identity(flag))

    @tf.function
    def total(flag):
        return strategy.run(replica_fn, args=(flag,))

    def any_set(flag):
        reduced = total(tf.constant(1.0 if flag else 0.0))
        return float(strategy.experimental_local_results(reduced)[0]) > 0
    return any_set
