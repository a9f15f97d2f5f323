"""Progress bars that show only where a person watches them.

A bar redraws itself with carriage returns several times a second. On a terminal that is one
moving line; in a log redirected to a file (a batch job, CI, ``2> run.log``) it is thousands of
``\\r`` fragments around the lines that matter. So every bar in mixpipe comes from here and is
off unless its stream is a terminal, and off whenever the user asked for no progress.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, show: bool = True,
                 **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar that draws only on a terminal, and never when ``show`` is False.

    ``show`` carries the user's choice (``--no-progress``, ``progress=False``); True means "if
    anyone can see it", not "even into a file". tqdm's own ``disable=None`` is that test: it
    looks at the bar's stream (``file=``, default stderr) when the bar starts. Other keyword
    arguments go to ``tqdm`` unchanged.
    """
    if "disable" in kwargs:
        raise TypeError("progress_bar takes show=, not disable=")
    return tqdm(iterable, disable=None if show else True, **kwargs)
