"""Data: sources (builtin, folder, tfds, tfrecord), image files, augmentation, pipelines.

The choices below are TF-free, so that binaries check a flag before importing TF.
"""

from co2_tf.errors import UserError

# The two-crop recipes of co2_tf.data.augment.
AUGMENTS = ("mocov1", "mocov2")
# Where the augmentation's steps after the crop run (co2_tf.data.augment_device).
AUGMENT_PLACEMENTS = ("auto", "host", "device")
# --augment_on=auto on CPUs: the placement measured faster there (docs/performance.md).
CPU_PLACEMENT = "host"


def resolve_placement(augment_on, accelerated):
    """"host" or "device" for --augment_on; `accelerated`: the step runs on GPUs or TPUs."""
    if augment_on not in AUGMENT_PLACEMENTS:
        raise UserError(f"unknown --augment_on={augment_on!r}: use one of "
                        f"{', '.join(AUGMENT_PLACEMENTS)}")
    if augment_on != "auto":
        return augment_on
    return "device" if accelerated else CPU_PLACEMENT
