"""A missing optional dependency says which ``pip install mixpipe[...]`` brings it."""
from __future__ import annotations

import importlib
import sys

import pytest

from mixpipe.cli import main
from mixpipe.extras import install_hint


def _hide(monkeypatch, library: str, *ours: str) -> None:
    """Make ``library`` unimportable and forget our modules that imported it."""
    monkeypatch.setitem(sys.modules, library, None)
    for name in [m for m in sys.modules if any(m == o or m.startswith(o + ".") for o in ours)]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("library, package, extra", [
    ("nvidia.dali", "mixpipe.dali", "dali"),
    ("ffcv", "mixpipe.ffcv", "ffcv"),
])
def test_adapter_import_names_the_extra(monkeypatch, library, package, extra):
    _hide(monkeypatch, library, package)
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'mixpipe\[{extra}\]'") as info:
        importlib.import_module(package)
    assert "\n" not in str(info.value)


def test_command_line_prints_one_line(monkeypatch, capsys):
    _hide(monkeypatch, "zmq", "mixpipe.server.cli", "mixpipe.server.network",
          "mixpipe.server.client")
    assert main(["serve", "--bind", "tcp://127.0.0.1:*", "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixpipe: error: pyzmq is not installed (no module 'zmq'): "
                   "pip install 'mixpipe[server]'"]


def test_other_import_errors_are_left_alone():
    assert install_hint(ModuleNotFoundError("x", name="somethingelse")) is None
    assert install_hint(ImportError("x", name="zmq")) is None  # a broken install, not missing
