"""What every co2_tf binary shares: flags from a config dataclass, one-line errors.

Binaries (not the library) read absl FLAGS: they turn them into a typed
config here and pass it to library functions.
"""

import dataclasses
import os
import sys

# The one path insert: README's commands run `python tools/NAME.py` from a clean
# checkout, where co2_tf is not installed (after `pip install .` it changes nothing).
# local-only: the checkout's own code, not a user path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's custom ops, which TF's wheels turn on by themselves only on CPUs with
# AVX-512 VNNI/BF16 or AMX; on AVX2-only CPUs they make the train step faster
# (docs/performance.md). TF reads the variable once, at import, so it is set here,
# before any tool imports TF. A value the user exported wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import (
    flags,  # noqa: E402
    logging,  # noqa: E402
)

from co2_tf.errors import UserError, user_error_in  # noqa: E402


def quiet_logs():
    """absl's INFO lines (e.g. every checkpoint write) drown the progress output."""
    logging.set_verbosity(logging.WARNING)


def define_flags(config_cls, help_texts, skip=(), choices=None):
    """Defines one absl flag per dataclass field, typed by the field's default.

    Fields named in `choices` (name -> allowed values) become enum flags, so
    that --help lists their values.
    """
    # A config's own CHOICES (e.g. EvalConfig's --strategy) and the caller's.
    choices = dict(getattr(config_cls, "CHOICES", {}), **(choices or {}))
    # Registered as the binary's own flags, so that --help (not only --helpfull) lists them.
    owner = {"module_name": sys.argv[0]}
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        default = field.default
        text = help_texts.get(field.name, field.name)
        if field.name in choices:
            flags.DEFINE_enum(field.name, default, list(choices[field.name]), text, **owner)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(field.name, default, text, **owner)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, text, **owner)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, text, **owner)
        else:
            flags.DEFINE_string(field.name, default, text, **owner)


def parse_flags(argv):
    """absl's flag parser with our error format: a bad flag value is one `error:` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}: see --help for the accepted values")


def config_from_flags(config_cls, **overrides):
    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(config_cls)
              if f.name in flags.FLAGS}
    values.update(overrides)
    return config_cls(**values)


def fail(message, code=1):
    """One line on stderr, no traceback, non-zero exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_guarded(fn, *args, **kwargs):
    """Runs fn; a UserError (also one raised inside a tf.data pipeline) becomes one line
    and exit code 1. A stop with its own exit code (co2_tf's NonFiniteLoss 3, SaveFailed 4,
    Preempted 130/143: README, "Resume and preemption") becomes one line and that code."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside a checkpointed loop: nothing to resume from
        fail("interrupted (Ctrl-C)", code=130)
    except Exception as e:  # a TF error quoting a UserError from inside the input pipeline
        if isinstance(getattr(e, "exit_code", None), int):
            fail(str(e), code=e.exit_code)
        message = user_error_in(e)
        if message is None:
            raise
        fail(message)
