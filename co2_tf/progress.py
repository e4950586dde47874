"""Progress lines for logs: what a person reading nohup.out, a SLURM log or a TPU VM's log sees.

On a terminal Keras's progress bar shows how a run goes. Off a terminal
(stdout redirected) Keras prints one line per epoch, about 5,000 silent steps
on ImageNet, and nothing at all while a folder is scanned or kNN features are
computed. A `Reporter` (the interval, a clock, where lines go) makes
`Progress` counters that print one line at most every `every_secs` seconds:

    train: 1200/5000 steps (24%), 3.52 steps/s, 5m41s elapsed, ETA 18m00s, loss 6.147

The rate is the one since the previous line (the current speed, not diluted
by a slow start), the ETA the rest of the task at that rate. The clock is
injectable: tests drive a fake one instead of sleeping. Pure Python (no TF:
co2_tf.config imports it); Keras's fit reports through
co2_tf.run.callbacks.ProgressCallback.
"""

import dataclasses
import sys
import time

HELP = ("seconds between progress lines (step, rate, ETA, loss) when stdout is not a "
        "terminal (nohup, SLURM, a log file); 0 = off. On a terminal: Keras's progress bar")


def format_duration(seconds):
    """42s, 18m00s, 5h03m, 2d03h: two units at most."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(rate):
    """Three significant digits without an exponent: 0.0123, 3.52, 41.7, 1234."""
    if rate >= 100:
        return f"{rate:.0f}"
    return f"{rate:.3g}"


def progress_line(what, count, total, unit, rate, elapsed, scalars=None):
    """One progress line (see the module docstring); total None = unknown (no ETA)."""
    parts = [f"{what}: {count}/{total} {unit} ({100 * count / total:.0f}%)" if total
             else f"{what}: {count} {unit}",
             f"{format_rate(rate)} {unit}/s", f"{format_duration(elapsed)} elapsed"]
    if total and rate > 0:
        parts.append(f"ETA {format_duration(max(0, total - count) / rate)}")
    parts.extend(f"{name} {value:.4g}" for name, value in (scalars or {}).items())
    return ", ".join(parts)


def _print_line(line):
    print(line, flush=True)  # flushed: a redirected stdout is block-buffered


class Progress:
    """A counter that prints a progress line when `every_secs` have passed since the last."""

    def __init__(self, what, total=None, unit="steps", *, every_secs, clock, write, start=0):
        self.what, self.total, self.unit = what, total, unit
        self.every_secs, self.clock, self.write = every_secs, clock, write
        self.started = self.last_time = clock()
        self.start = self.last_count = self.count = start
        self.lines = 0

    def due(self):
        """Whether the next update prints: lets a caller skip reading what it would print."""
        return self.every_secs > 0 and self.clock() - self.last_time >= self.every_secs

    def add(self, number, **scalars):
        """update(count + number)."""
        return self.update(self.count + number, **scalars)

    def update(self, count, **scalars):
        """Sets the count; prints a line if one is due and returns it (or None)."""
        self.count = count
        now = self.clock()
        if not (self.every_secs > 0 and now - self.last_time >= self.every_secs):
            return None
        rate = (count - self.last_count) / max(now - self.last_time, 1e-9)
        line = progress_line(self.what, count, self.total, self.unit, rate, now - self.started,
                             scalars)
        self.write(line)
        self.last_time, self.last_count = now, count
        self.lines += 1
        return line

    def done(self, count):
        """A last line for a task long enough to have printed one; returns it (or None)."""
        if not self.lines:
            return None
        elapsed = self.clock() - self.started
        line = (f"{self.what}: done, {count} {self.unit} in {format_duration(elapsed)} "
                f"({format_rate((count - self.start) / max(elapsed, 1e-9))} {self.unit}/s)")
        self.write(line)
        return line


@dataclasses.dataclass(frozen=True)
class Reporter:
    """Makes `Progress` counters sharing an interval (0 = off), a clock and an output.

    Equal settings compare equal (a cache key may hold one: co2_tf.data.image_files).
    """
    every_secs: float = 60.0
    clock: object = time.monotonic
    write: object = _print_line

    @classmethod
    def for_stdout(cls, every_secs):
        """On only when stdout is not a terminal (where Keras's progress bar is)."""
        return cls(every_secs if every_secs > 0 and not sys.stdout.isatty() else 0.0)

    @property
    def on(self):
        return self.every_secs > 0

    def task(self, what, total=None, unit="steps", start=0):
        return Progress(what, total, unit, every_secs=self.every_secs, clock=self.clock,
                        write=self.write, start=start)


OFF = Reporter(0.0)


def reporter(progress):
    """`progress` itself, or OFF for None: what library functions take."""
    return OFF if progress is None else progress
