"""Optional dependencies: a missing one says which ``pip install mixpipe[...]`` brings it.

mixpipe's core needs only numpy, torch and pillow; DALI, FFCV and pyzmq are extras. A bare
``ModuleNotFoundError: No module named 'nvidia'`` does not tell a user that, so the adapter
packages import their library through :func:`require`, and the command line turns the same error
into one line (:func:`install_hint`).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ["EXTRAS", "require", "install_hint"]

#: top-level module -> (extra, what it is, an install note beyond the extra)
EXTRAS = {
    "nvidia": ("dali", "NVIDIA DALI", ""),
    "ffcv": ("ffcv", "FFCV", " (it builds from source: install numpy first, then pip install "
                             "--no-build-isolation ffcv==1.0.2)"),
    "zmq": ("server", "pyzmq", ""),
    "matplotlib": ("bench", "matplotlib", ""),
}


def install_hint(err: BaseException) -> Optional[str]:
    """The one-line fix for an ImportError of an optional dependency, or None for any other."""
    name = getattr(err, "name", None) or ""
    entry = EXTRAS.get(name.split(".", 1)[0])
    if not isinstance(err, ModuleNotFoundError) or entry is None:
        return None
    extra, what, note = entry
    return f"{what} is not installed (no module {name!r}): pip install 'mixpipe[{extra}]'{note}"


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, with the install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        hint = install_hint(err)
        if hint is None:
            raise
        raise ModuleNotFoundError(hint, name=err.name) from None
