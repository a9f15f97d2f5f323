"""What a wheel of mixpipe must carry: the licence text, the version, type information, and the
ready pipelines the documentation imports."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest

import mixpipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_and_licence_in_the_tree():
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", mixpipe.__version__)
    with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub
    assert os.path.isfile(os.path.join(os.path.dirname(mixpipe.__file__), "py.typed"))


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "mixpipe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mixpipe/py.typed" in names
    assert {"pipelines/__init__.py", "pipelines/dali_imagenet.py",
            "pipelines/ffcv_imagenet.py"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {mixpipe.__version__}" in metadata.splitlines()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
