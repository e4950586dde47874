"""What every co2_tf binary shares: flags from config dataclasses, one runner, one-line errors.

Binaries (not the library) read absl FLAGS: `tool` turns a config dataclass's fields into
flags (their help, choices and group are on the fields, co2_tf.config.flag) and the parsed
flags back into the config; `run_tool` runs the binary with the exit codes of README.md,
"Resume and preemption": 0 done, 1 bad input, 3 non-finite loss, 4 save failed, 130/143
interrupted (SIGINT/SIGTERM).
"""

import dataclasses
import os
import re
import sys

# The one path insert: README's commands run `python tools/NAME.py` from a clean
# checkout, where co2_tf is not installed (after `pip install .` it changes nothing).
# local-only: the checkout's own code, not a user path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's custom ops, which TF's wheels turn on by themselves only on CPUs with
# AVX-512 VNNI/BF16 or AMX; on AVX2 + FMA CPUs they make the train step faster too
# (docs/performance.md). TF reads the variable once, when it is imported, so it is set
# here, before any tool imports TF. A value the user exported wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import (  # noqa: E402
    app,
    flags,
    logging,
)

from co2_tf.errors import UserError, user_error_in  # noqa: E402


def quiet_logs():
    """absl's INFO lines (e.g. every checkpoint write) drown the progress output."""
    logging.set_verbosity(logging.WARNING)


def flag_fields(config_cls, skip=()):
    """The fields of a config class that are flags: those with a help text (co2_tf.config.flag)."""
    return [f for f in dataclasses.fields(config_cls)
            if "help" in f.metadata and f.name not in skip]


def flag_name(field):
    """A field's flag: its name, or metadata "flag" (e.g. a repeated --cell fills `cells`)."""
    return field.metadata.get("flag", field.name)


def _section(group):
    """absl's --helpfull lists flags by module name, sorted: one "module" per field group."""
    from co2_tf.config import GROUPS  # noqa: PLC0415
    number = GROUPS.index(group) + 1 if group in GROUPS else len(GROUPS) + 1
    return f"{number}. {group}"  # digits first: before absl's own modules


def define_flags(config_cls, skip=()):
    """Defines one absl flag per flag field, typed by the field's default.

    Fields with choices become enum flags (--help lists their values); tuple fields become
    comma-separated lists, or repeatable flags when the field's metadata says "multi".
    Every flag is a key flag of the binary (sys.argv[0]), so that --help lists them all;
    --helpfull lists them by the fields' groups.
    """
    for field in flag_fields(config_cls, skip):
        name, default, text = flag_name(field), field.default, field.metadata["help"]
        if default is dataclasses.MISSING:
            default = field.default_factory()
        group = field.metadata.get("group")
        owner = {"module_name": _section(group) if group else sys.argv[0]}
        if "choices" in field.metadata:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), text,
                                     **owner)
        elif isinstance(default, tuple) and field.metadata.get("multi"):
            flags.DEFINE_multi_string(name, [str(v) for v in default], text, **owner)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], text, **owner)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(name, default, text, **owner)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, **owner)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, **owner)
        else:
            flags.DEFINE_string(name, default, text, **owner)
        if group:
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def _typed(field, value):
    """A list flag's strings as the tuple the field holds (its default's element type)."""
    if not isinstance(value, list):
        return value
    default = field.default if field.default is not dataclasses.MISSING else ()
    kind = type(default[0]) if default else str
    try:
        return tuple(kind(v) for v in value)
    except ValueError:
        raise UserError(f"--{flag_name(field)}={','.join(value)}: give {kind.__name__} values, "
                        f"comma-separated, e.g. --{flag_name(field)}="
                        f"{','.join(str(v) for v in default)}") from None


def config_from_flags(config_cls, **overrides):
    """The config from the parsed flags; fields that are no flags keep their defaults."""
    values = {f.name: _typed(f, getattr(flags.FLAGS, flag_name(f)))
              for f in flag_fields(config_cls) if flag_name(f) in flags.FLAGS}
    values.update({k: v for k, v in overrides.items()
                   if k in {f.name for f in dataclasses.fields(config_cls)}})
    return config_cls(**values)


def parse_flags(argv):
    """absl's flag parser with our error format: a bad flag value is one `error:` line (a
    value outside a field's choices is worded as the config's own check words it)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        choice = re.fullmatch(r"flag --(\w+)=(.*): value should be one of <(.*)>", str(e))
        if choice:
            name, value, choices = choice.groups()
            fail(f"unknown --{name}={value!r}: use one of {', '.join(choices.split('|'))}")
        fail(f"{e}: see --help for the accepted values")


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


def tool(run, *config_classes, skip=(), overrides=None, check=True):
    """Defines the flags of `config_classes` and returns the binary's absl main(argv).

    main: no positional arguments; quiet absl logs; one config per class from the flags
    (`overrides`: values for fields that are no flags here, e.g. a benchmark's model_dir);
    each config's check() (if it has one) unless check=False; then run(*configs), its errors
    mapped to exit codes (run_guarded). `skip`: fields offered as no flag (they keep their
    defaults).
    """
    for config_cls in config_classes:
        define_flags(config_cls, skip)

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
        quiet_logs()

        def configured_run():
            configs = [config_from_flags(cls, **(overrides or {})) for cls in config_classes]
            for config in configs if check else ():
                if hasattr(config, "check"):
                    config.check()
            return run(*configs)

        run_guarded(configured_run)

    return main


def run_tool(main):
    """Runs a binary's main (from `tool`) as a program: parses sys.argv, exits with its code."""
    app.run(main, flags_parser=parse_flags)
