"""Data: sources (builtin, folder, tfds, tfrecord), image files, augmentation, pipelines."""
