"""flags/*.cfg presets parsed in-process by absl, with TrainConfig's fields (no tool import)."""
import dataclasses
import os

from absl import flags

from co2_tf.config import TrainConfig

FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "flags")


def preset_config(name, **overrides):
    """flags/NAME parsed by absl into a checked TrainConfig (a fresh FlagValues: the
    process's absl FLAGS are untouched), then `overrides` applied."""
    values = flags.FlagValues()
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        define = (flags.DEFINE_boolean if isinstance(default, bool) else
                  flags.DEFINE_integer if isinstance(default, int) else
                  flags.DEFINE_float if isinstance(default, float) else flags.DEFINE_string)
        define(field.name, default, field.name, flag_values=values)
    values(["x", f"--flagfile={os.path.join(FLAGS_DIR, name)}", "--model_dir=/tmp/unused"])
    config = TrainConfig(**{f.name: values[f.name].value for f in dataclasses.fields(TrainConfig)})
    return dataclasses.replace(config.check(), **overrides)
