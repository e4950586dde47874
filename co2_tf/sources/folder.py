"""Image folders: ``folder:PATH`` with PATH/<class>/**/<image files>.

Files nested at any depth below a class folder belong to that class; classes
are the sorted class-folder names. ``{split}`` in PATH is replaced by the
split (``folder:/data/imagenet/{split}``); without it every split reads PATH.
Scanning, checks and decoding: co2_tf.image_files.
"""

import tensorflow as tf

from co2_tf import image_files
from co2_tf.errors import UserError
from co2_tf.sources import base


class FolderSource(base.Source):
    """Image files in class folders: indexed, damaged files handled at run time."""

    may_fail = True
    eval_split_candidates = ("val", "validation", "test")

    def listing(self, split):
        return image_files.list_folder(self.spec.folder_root(split), self.max_image_pixels,
                                       self.progress)

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
        listing = self.listing(split)
        paths = tf.constant(list(listing.files))
        labels = tf.constant(listing.labels, tf.int32)
        return lambda i: (image_files.read_and_decode(tf.gather(paths, i), listing.max_pixels),
                          tf.gather(labels, i))

    def image_stream(self, split, source_of, image_size, num_parallel_calls):
        # Damaged files become gray stand-ins, so element c is still example source_of(c).
        listing = self.listing(split)
        return image_files.decoded_stream(tf.constant(list(listing.files)), source_of,
                                          num_parallel_calls, folder=listing.root,
                                          max_pixels=listing.max_pixels)
