"""Image folders: ``folder:PATH`` with PATH/<class>/**/<image files>.

Files nested at any depth below a class folder belong to that class; classes
are the sorted class-folder names. ``{split}`` in PATH is replaced by the
split (``folder:/data/imagenet/{split}``); without it every split reads PATH.
Scanning, checks and decoding: co2_tf.data.image_files; the scan is made once and
kept in an index file that every later process reads (co2_tf.data.folder_index),
from which the pipelines read the paths (no path list in the graph).
"""

import tensorflow as tf

from co2_tf.data import folder_index, image_files
from co2_tf.data.sources import base
from co2_tf.errors import UserError


class FolderSource(base.Source):
    """Image files in class folders: indexed, damaged files handled at run time."""

    may_fail = True
    eval_split_candidates = ("val", "validation", "test")

    def _indexed(self, split):
        """(FolderListing, its index file or None)."""
        return folder_index.listing(self.spec.folder_root(split), self.max_image_pixels,
                                    self.options.check_image_files, self.options.index_dir,
                                    self.progress)

    def listing(self, split):
        return self._indexed(split)[0]

    def root(self, split):
        return self.listing(split).root

    def files(self, split):
        return self.listing(split).files

    def _path_fn(self, split):
        """i -> (path, label) in graph ops: from the index file, or a constant if unwritten."""
        listing, index_file = self._indexed(split)
        if index_file is not None:
            return folder_index.path_table(index_file, listing.root)
        paths = tf.constant(list(listing.files))
        labels = tf.constant(listing.labels, tf.int32)
        return lambda i: (tf.gather(paths, i), tf.gather(labels, i))

    def validate(self, split="train"):
        self.listing(split)

    def num_examples(self, split="train"):
        return len(self.listing(split).files)

    def class_names(self, split="train"):
        return list(self.listing(split).class_names)

    def labels(self, split):
        return base.as_int32(self.listing(split).labels)

    def default_eval_split(self):
        if "{split}" not in self.spec.path:
            raise UserError(f"--dataset={self.spec} has a single folder (no {{split}} in the "
                            "path): use folder:ROOT/{split} with ROOT/train and ROOT/val, or "
                            "pass --eval_split to evaluate on the same images")
        return super().default_eval_split()

    def example_fn(self, split, image_size):
        max_pixels = self.listing(split).max_pixels
        path_of = self._path_fn(split)

        def example(i):
            path, label = path_of(i)
            return image_files.read_and_decode(path, max_pixels), label
        return example

    def image_stream(self, split, source_of, image_size, num_parallel_calls):
        # Damaged files become gray stand-ins, so element c is still example source_of(c).
        listing = self.listing(split)
        path_of = self._path_fn(split)
        return image_files.decoded_stream(lambda i: path_of(i)[0], source_of,
                                          num_parallel_calls, folder=listing.root,
                                          max_pixels=listing.max_pixels,
                                          count=len(listing.files))
