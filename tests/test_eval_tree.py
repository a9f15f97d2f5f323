"""Evaluation over a tree of photos of many sizes (60-500 px, greyscale, CMYK, a PNG named .jpg):
every loader resizes and centre-crops to the training size instead of stacking whole images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixpipe.data import FileListDataset, prepare_tree
from mixpipe.data.synthetic import TreeSpec, list_split, make_tree
from mixpipe.train import EvalBatches, evaluate
from mixpipe.train.evaluate import center_crop

SIZE = 64
SPEC = TreeSpec(classes=2, train_per_class=4, val_per_class=2, sides=(60, 500), greyscale=1,
                cmyk=1, png_as_jpg=1, seed=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaltree")
    tree = make_tree(str(base / "src"), SPEC)
    out = base / "out"
    prepare_tree(tree.root, out, workers=1, holdout=0.0, log=lambda _: None)
    return tree, out


def _reference(ds, ratio=224 / 256):
    return np.stack([np.moveaxis(center_crop(ds[i][0], SIZE, ratio), 2, 0)
                     for i in range(len(ds))])


def _assert_same_pictures(images: np.ndarray, reference: np.ndarray, tolerance: float) -> None:
    """Same crop of the same pictures, up to the resampling filter: per-image channel means
    agree and the pixels correlate. (Pixel-exact comparison is wrong here: the images carry
    noise, and DALI's, FFCV's and pillow's antialiasing filters differ.)"""
    a, b = images.astype(np.float64), reference.astype(np.float64)
    assert np.abs(a.mean(axis=(2, 3)) - b.mean(axis=(2, 3))).max() < tolerance
    for x, y in zip(a, b):
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.9


def test_tree_has_what_real_trees_have(prepared):
    from PIL import Image

    tree, _ = prepared
    modes, formats, sides = set(), set(), set()
    for rel in tree.sizes:
        with Image.open(f"{tree.root}/{rel}") as im:
            modes.add(im.mode)
            formats.add(im.format)
            sides.add(im.size)
    assert {"L", "CMYK", "RGB"} <= modes and {"JPEG", "PNG"} <= formats
    assert len(sides) == len(tree.sizes)  # every image its own size
    assert all(60 <= min(hw) and max(hw) <= 750 for hw in tree.sizes.values())


def test_whole_images_of_many_sizes_are_refused_clearly(prepared):
    _, out = prepared
    with pytest.raises(ValueError, match="size=S"):
        list(EvalBatches(FileListDataset(out, "train"), batch_size=4))


def test_torch_eval_batches_resize_and_centre_crop(prepared):
    tree, out = prepared
    ds = FileListDataset(out, "train")
    batches = EvalBatches(ds, batch_size=5, size=SIZE)
    images, labels = map(torch.cat, zip(*batches))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (len(ds), 3, SIZE, SIZE)
    assert labels.tolist() == [y for _, y in list_split(tree, "train")]
    np.testing.assert_array_equal(images.numpy(), _reference(ds))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 2))
    assert 0.0 <= evaluate(model, batches) <= 1.0


def test_center_crop_geometry():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white
    out = center_crop(image, 50, ratio=1.0)  # shorter side 100 -> 50: the image is 50x100
    assert out.shape == (50, 50, 3)
    assert out[:, :20].max() == 0 and out[:, 30:].min() == 255
    grey = center_crop(np.full((30, 40), 7, np.uint8), (8, 12), ratio=0.5)
    assert grey.shape == (8, 12, 3) and (grey == 7).all()
    with pytest.raises(ValueError, match="ratio"):
        center_crop(image, 8, ratio=0)


def test_dali_val_batches(prepared):
    pytest.importorskip("nvidia.dali")
    from mixpipe.dali.evaluate import ValBatches

    tree, out = prepared
    ds = FileListDataset(out, "train")
    batches = ValBatches.for_split(str(out), "train", SIZE, batch_size=3)
    try:
        for _ in range(2):  # a second pass gives the same batches
            images, labels = map(torch.cat, zip(*batches))
            assert images.dtype == torch.uint8 and tuple(images.shape) == (len(ds), 3, SIZE, SIZE)
            assert labels.tolist() == [y for _, y in list_split(tree, "train")]
            _assert_same_pictures(images.numpy(), _reference(ds), 5)
    finally:
        batches.close()


@pytest.mark.slow
def test_ffcv_val_loader(prepared, tmp_path):
    pytest.importorskip("ffcv")
    from mixpipe.ffcv.presets import FFCVSettings, val_loader

    tree, out = prepared
    prepare_tree(tree.root, out, beton=True, workers=1, holdout=0.0, log=lambda _: None)
    settings = FFCVSettings(size=(SIZE, SIZE), stride=8, mean=(0, 0, 0), std=(1, 1, 1))
    loader = val_loader(str(out / "train.beton"), settings, 3, num_workers=1)
    loader.set_epoch(0)
    batches = list(loader)
    images = torch.cat([b.image for b in batches])
    labels = torch.cat([b.targets[:, 0] for b in batches])
    ds = FileListDataset(out, "train")
    assert tuple(images.shape) == (len(ds), 3, SIZE, SIZE)
    assert labels.tolist() == [y for _, y in list_split(tree, "train")]
    _assert_same_pictures(images.numpy(), _reference(ds), 6)  # the .beton re-encodes JPEGs


def test_dali_val_batches_name_a_corrupt_file(tmp_path):
    pytest.importorskip("nvidia.dali")
    from mixpipe.dali.evaluate import ValBatches

    tree = make_tree(str(tmp_path / "src"), TreeSpec(classes=2, train_per_class=3,
                                                     val_per_class=0, sides=(20, 30),
                                                     greyscale=0, cmyk=0, png_as_jpg=0,
                                                     corrupt=1, seed=4))
    listing = tmp_path / "list.txt"  # a user's own list: nothing prepared, nothing checked
    rows = list_split(tree, "train", skip=()) + [(tree.corrupt[0], 0)]
    listing.write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    batches = ValBatches(tree.root, str(listing), 16, batch_size=2)
    with pytest.raises(ValueError, match=f"{tree.corrupt[0]}: not a readable image"):
        list(batches)
