"""The checkpoint manager of a non-chief worker of a multi-worker run."""

import tempfile

import tensorflow as tf


class WorkerCheckpointManager:
    """What a non-chief worker of a multi-worker run saves with and restores from.

    Its saves are scratch: the variables are read collectively, so every
    worker takes part in a save, but only the chief's copy is the
    checkpoint. A worker writes its copy to a fresh temporary directory on
    its local disk (`scratch_root`, default the system's temp dir) and
    deletes it at once: nothing goes to the shared model dir, where on gs://
    every worker would upload a whole checkpoint per save.
    `latest_checkpoint` is the chief's, so a restarted worker resumes from
    the same step as the chief. The model dir must be shared by all workers
    (gs://, NFS).
    """

    def __init__(self, checkpoint, chief_dir, scratch_root=None):
        self.checkpoint = checkpoint
        self.chief_dir = chief_dir
        self.scratch_root = scratch_root
        self.directory = chief_dir  # where its checkpoints are (errors name it)

    @property
    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.chief_dir)

    def save(self, checkpoint_number=None):
        scratch = tempfile.mkdtemp(prefix="co2_tf_worker_", dir=self.scratch_root)
        try:
            return tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                checkpoint_number=checkpoint_number)
        finally:
            tf.io.gfile.rmtree(scratch)
