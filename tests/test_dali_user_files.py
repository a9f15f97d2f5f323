"""DALI over the user's own files: no prepare step, the package example runs as written, a
mirror after mix() is refused, and a file that is not an image is named."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

import mixpipe.dali as mxd  # noqa: E402
from mixpipe.core.plan import MixPlan  # noqa: E402
from mixpipe.data.synthetic import TreeSpec, make_tree  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = TreeSpec(classes=2, train_per_class=4, val_per_class=1, sides=(40, 90), greyscale=0,
                cmyk=0, png_as_jpg=0, seed=2)


@pytest.fixture
def tree(tmp_path):
    return make_tree(str(tmp_path / "src"), SPEC)


def _reader_order(file_root=None, file_list=None):
    """(bytes, label) per sample as DALI's own file reader lists them."""
    kwargs = {k: v for k, v in (("file_root", file_root), ("file_list", file_list)) if v}
    n = len(mxd.open_files(file_root, file_list))

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        data, labels = fn.readers.file(random_shuffle=False, **kwargs)
        return data, labels

    p = pipe()
    p.build()
    data, labels = p.run()
    return [(np.array(data[i]).tobytes(), int(np.array(labels[i]).item())) for i in range(n)]


def test_from_files_matches_dali_reader(tree, tmp_path):
    root = os.path.join(tree.root, "train")
    source = mxd.SlotSource.from_files(mxd.PlanBoard.temporary(), (32, 32), file_root=root)
    ours = [(source.images.encoded(i).tobytes(), source.images.label(i))
            for i in range(len(source.images))]
    assert ours == _reader_order(file_root=root)
    listing = tmp_path / "list.txt"
    listing.write_text("class01/img0001.jpg 1\nclass00/img0002.jpg 0\n")
    images = mxd.open_files(file_root=root, file_list=str(listing))
    assert [(images.encoded(i).tobytes(), images.label(i)) for i in range(2)] == \
        _reader_order(file_root=root, file_list=str(listing))
    with pytest.raises(ValueError, match="file_root= .*file_list="):
        mxd.open_files()


def _example_code() -> str:
    doc = mxd.__doc__
    block = doc.split("::\n", 1)[1].split("\nSee ", 1)[0]
    return textwrap.dedent(block)


@pytest.mark.slow
def test_package_example_runs_as_written(tree, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example_code())
    proc = subprocess.run([sys.executable, str(script), os.path.join(tree.root, "train")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok (8, 3, 64, 64)"


def _pipeline(source, mirror: str):
    @pipeline_def(enable_conditionals=True, batch_size=4, num_threads=1, device_id=None)
    def pipe():
        inputs = mxd.plan_inputs(source, parallel=False)
        images = mxd.mix(inputs, device="cpu")
        if mirror == "cmn":
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mirror=fn.random.coin_flip())
        elif mirror == "flip":
            images = fn.flip(images, horizontal=1)
        else:
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW")
        return (images, inputs.targets, inputs.weights, inputs.ids, inputs.layout,
                inputs.loss_scale)

    return pipe()


@pytest.mark.parametrize("mirror", ["cmn", "flip"])
def test_mirror_after_mix_is_refused(tree, mirror):
    source = mxd.SlotSource.from_files(mxd.PlanBoard.temporary(), (32, 32), stride=8,
                                       file_root=os.path.join(tree.root, "train"))
    with pytest.raises(ValueError, match="mirrors the mixed composite.*Drop mirror="):
        mxd.MixIterator(_pipeline(source, mirror), source)


def test_pipeline_without_mirror_is_accepted(tree):
    source = mxd.SlotSource.from_files(mxd.PlanBoard.temporary(), (32, 32), stride=8,
                                       file_root=os.path.join(tree.root, "train"))
    pipe = _pipeline(source, "none")
    assert mxd.ops.whole_batch_mirrors(pipe) == []
    loader = mxd.MixIterator(pipe, source)
    with loader:
        batches = list(loader)
    assert sum(int((b.loss_scale > 0).any(dim=1).sum()) for b in batches) == len(source.images)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    bad = make_tree(str(tmp_path / "bad"), TreeSpec(classes=2, train_per_class=2,
                                                    val_per_class=0, sides=(20, 30), greyscale=0,
                                                    cmyk=0, png_as_jpg=0, corrupt=1, seed=1))
    root = os.path.join(bad.root, "train")
    source = mxd.SlotSource.from_files(mxd.PlanBoard.temporary(), (16, 16), stride=8,
                                       file_root=root)
    index = [source.images.path(i) for i in range(len(source.images))].index(
        os.path.join(bad.root, bad.corrupt[0]))
    plan = MixPlan.singles(len(source.images))
    with pytest.raises(ValueError, match=f"{bad.corrupt[0]}: not a readable image.*--on-bad"):
        source.slot(plan, index)
