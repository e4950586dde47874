"""One run per run dir: RUN_DIR/.lock names the run that writes there.

Two `tools/train.py` on one `--model_dir` (a second terminal, a restarted
job while the old one still runs) would overwrite each other's checkpoints.
The lock is a small JSON file (host, pid, start time, heartbeat) written
through gfile, so it works on gs:// too:

- taking it: if a lock is there and alive, a UserError names its holder;
  a stale one (its pid is gone on this host, or no heartbeat for
  `stale_seconds`) is taken over with a warning;
- holding it: a daemon thread refreshes the heartbeat every
  `heartbeat_seconds`;
- releasing it: deleted at exit (done, error, preemption), if still ours.

What it guarantees: object stores (gs://, s3://) have no exclusive create,
so the lock is written, then read back after `settle_seconds`; the later of
two writers wins and the other is refused. That catches the common mistake,
a second run started on a dir in use; it is not a mutex against two runs
started within the same second. Only the chief of a multi-worker run takes it.
"""

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import uuid

import tensorflow as tf

from co2_tf import io
from co2_tf.errors import UserError
from co2_tf.run import rundir

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 60
STALE_SECONDS = 600


def _describe(holder):
    since = datetime.datetime.fromtimestamp(holder.get("start", 0)).isoformat(
        sep=" ", timespec="seconds")
    age = time.time() - holder.get("heartbeat", 0)
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}, "
            f"last heartbeat {age:.0f} s ago")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process: alive
        return True
    return True


class RunLock(contextlib.AbstractContextManager):
    """Holds RUN_DIR/.lock while the block runs; UserError if another run holds it."""

    def __init__(self, model_dir, *, stale_seconds=STALE_SECONDS,
                 heartbeat_seconds=HEARTBEAT_SECONDS, settle_seconds=None):
        self.path = io.join(model_dir, LOCK_FILE)
        self.model_dir = model_dir
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        # Long enough for a competing write on an object store to land.
        self.settle_seconds = (settle_seconds if settle_seconds is not None
                               else 1.0 if io.is_remote(model_dir) else 0.05)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.start = time.time()
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            return io.read_json(self.path) if io.exists(self.path) else None
        except (ValueError, tf.errors.OpError):  # half-written by a crashed run: stale
            return {}

    def _write(self):
        io.write_json_atomic(self.path, {
            "host": self.host, "pid": os.getpid(), "start": self.start,
            "heartbeat": time.time(), "token": self.token})

    def _stale(self, holder):
        """Why `holder` no longer holds the lock, or None if it does."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("host") == self.host and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} is gone"
        if time.time() - holder.get("heartbeat", 0) > self.stale_seconds:
            return f"no heartbeat for over {self.stale_seconds // 60} min"
        return None

    def _refuse(self, holder):
        raise UserError(f"{self.model_dir} is in use by another run ({_describe(holder)}): "
                        f"wait for it to end or use another --model_dir (a lock without "
                        f"heartbeat for {self.stale_seconds // 60} min is taken over)")

    def __enter__(self):
        holder = self._read()
        if holder is not None:
            why = self._stale(holder)
            if why is None:
                self._refuse(holder)
            log.warning("%s: taking over the stale lock %s (%s)", self.model_dir,
                        _describe(holder) if holder else "", why)
        try:
            self._write()
        except (OSError, tf.errors.OpError) as e:
            raise rundir.cannot_write(self.model_dir, e) from None
        time.sleep(self.settle_seconds)
        holder = self._read()
        if not holder or holder.get("token") != self.token:
            self._refuse(holder or {})
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="co2_tf-run-lock")
        self._thread.start()
        return self

    def _heartbeat(self):
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if (self._read() or {}).get("token") != self.token:
                    log.warning("the lock %s was taken over by another run", self.path)
                    return
                self._write()
            except (OSError, tf.errors.OpError) as e:  # a flaky bucket: try again later
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                io.remove(self.path)
        except (OSError, tf.errors.OpError) as e:
            log.warning("could not release the lock %s: %s", self.path, e)
        return False
