"""The README's Python snippets run, as written, on a tiny prepared data set.

A front-page snippet that no longer runs is the first thing a new user meets, and nothing else
would notice it: each ```python block of README.md is run here as a whole program, in its own
process, with only its data directory and epoch count swapped for a tiny generated tree and two
epochs (one warm-up, one mixed). Every snippet must therefore start from
``DATA, EPOCHS = "<dir>", <n>``; a block without that line fails instead of going untested.
After it, the test checks what the snippet promises: every training sample's loss reached the
service, and the mixed epoch's plan put samples into composites.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from typing import List

import pytest

from mixpipe.data import find_prepared, prepare_tree
from mixpipe.data.synthetic import TreeSpec, make_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
EPOCHS = 2
SETTINGS_LINE = re.compile(r'^DATA, EPOCHS = "[^"\n]*", \d+$', re.M)
#: Appended to each snippet: what it must have done, printed for the test to read.
CHECK = """
_plan = service.plan(EPOCHS - 1)
print("SNIPPET-CHECK", service.stats()["seen"], int((_plan.counts > 1).sum()))
"""


def python_blocks(markdown: str) -> List[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, re.M | re.S)


def blocks() -> List[str]:
    with open(README, encoding="utf-8") as f:
        return python_blocks(f.read())


def needs(block: str) -> str:
    """The optional library a block imports ('' for none): its test skips without it."""
    for module in ("nvidia.dali", "ffcv"):
        if re.search(rf"^(from|import) {re.escape(module)}\b", block, re.M):
            return module
    return ""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """Three classes of 30 images, 32-48 px, prepared with arrays (torch), the file list (DALI)
    and a .beton (FFCV, where it can be written). The 81 training images left after the hold-out
    outnumber the snippets' 74-slot batches, so an epoch ends in a short (odd) batch, the case
    that once crashed torch's CPU backward on the FFCV loader's channels-last images."""
    base = tmp_path_factory.mktemp("readme")
    tree = make_tree(str(base / "src"), TreeSpec(classes=3, train_per_class=30, val_per_class=4,
                                                 sides=(32, 48), seed=2))
    beton = importlib.util.find_spec("ffcv") is not None
    prepare_tree(tree.root, str(base / "out"), beton=beton, arrays=True, array_size=32,
                 workers=1, log=lambda _: None)
    return str(base / "out")


def test_the_readme_shows_the_three_loaders():
    found = [needs(b) for b in blocks()]
    assert sorted(found) == ["", "ffcv", "nvidia.dali"], found
    for block in blocks():
        assert len(SETTINGS_LINE.findall(block)) == 1, block[:200]


@pytest.mark.parametrize("index", range(len(blocks())),
                         ids=lambda i: needs(blocks()[i]) or "torch")
def test_readme_snippet_runs(index, prepared, tmp_path):
    block = blocks()[index]
    if needs(block):
        pytest.importorskip(needs(block))
    program = SETTINGS_LINE.sub(f"DATA, EPOCHS = {prepared!r}, {EPOCHS}", block) + CHECK
    script = tmp_path / "snippet.py"
    script.write_text(program, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, f"README snippet {index} failed:\n{program}\n" \
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    seen, composites = map(int, re.search(r"^SNIPPET-CHECK (\d+) (\d+)$", proc.stdout,
                                          re.M).groups())
    assert seen == find_prepared(prepared).samples["train"]  # every sample's loss came back
    assert composites > 0  # the epoch after the warm-up mixed
