"""Progress on the command line: a line per phase (stdout), and a tqdm bar per sampling run (stderr).

A bar counts the run's steps over all its windows, shows the window, the newest chunk's step and the reuses so
far (``StepInfo.text()``), and tqdm's rate and time left. Bars are drawn when stderr is a terminal and the
command has no ``--quiet``; ``FLOWCACHE_PROGRESS=1`` draws them anyway (a log that keeps carriage returns, a
test), ``FLOWCACHE_PROGRESS=0`` never. The phase lines are printed either way, so a log is never silent
through a long step. Without tqdm installed there are no bars, only the lines.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from .runner import RunHooks, StepInfo

ENV = "FLOWCACHE_PROGRESS"


def bars_wanted(quiet: bool = False) -> bool:
    """Whether to draw bars: never with ``quiet``; else ``FLOWCACHE_PROGRESS`` (1/0) if set; else whether stderr
    is a terminal."""
    if quiet:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def _print(text: str) -> None:
    print(text, flush=True)


class Progress:
    """What a long job reports through: ``say`` a phase line; ``run(label)`` around one sampling run yields the
    ``RunHooks`` that drive its bar (None when no bar is drawn: the run then has no callback at all, so timings
    are not touched). ``leave``: keep each finished bar on screen (the demo) or clear it (bench's many runs)."""

    def __init__(self, bars: bool = False, say: Callable[[str], None] | None = _print, leave: bool = True):
        self.bars, self._say, self.leave = bars, say, leave

    @classmethod
    def off(cls) -> "Progress":
        """Nothing printed, no bars: the default of the Python functions."""
        return cls(bars=False, say=None)

    def say(self, text: str) -> None:
        if self._say is not None:
            self._say(text)

    @contextlib.contextmanager
    def run(self, label: str) -> Iterator[RunHooks | None]:
        if not self.bars:
            yield None
            return
        try:
            from tqdm import tqdm
        except ImportError:  # a dependency, but progress is never worth a failed run
            yield None
            return
        # delay: first drawn at a step, once the run has said how many steps it has
        bar = tqdm(desc=label, total=None, unit="step", file=sys.stderr, leave=self.leave, dynamic_ncols=True,
                   mininterval=0.25, delay=1e-9,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} steps [{elapsed}<{remaining}, "
                              "{rate_fmt}{postfix}]")

        def on_step(info: StepInfo) -> None:
            if bar.total != info.total:
                bar.total = info.total
            bar.set_postfix_str(info.text(), refresh=False)
            bar.update(info.done - bar.n)

        try:
            yield RunHooks(on_step=on_step)
        finally:
            bar.close()


__all__ = ["ENV", "Progress", "bars_wanted"]
