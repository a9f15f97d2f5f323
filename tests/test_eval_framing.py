"""The speed-up benchmark scores images framed as training showed them.

Training with ``--augment none`` or ``flip`` resizes whole images to their regions; only
``--augment crop`` (on a loader that really crops) trains on crops. An evaluation that
centre-crops 0.875 of images the model only ever saw whole zooms them in by 14 %, which cost the
plain model 9 points on CIFAR-10. The data here make that visible: the class is the colour of a
thin frame at the image border, the centre is the same in every image, so a classifier fit on
training views can only score images that keep their border.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mixpipe.bench.speedup.loaders import constituent_transform
from mixpipe.bench.speedup.settings import SpeedupSettings
from mixpipe.core.plan import MixPlan
from mixpipe.core.source import FixedPlans
from mixpipe.data import FileListDataset, prepare_tree
from mixpipe.torch import MixedLoader
from mixpipe.train import EvalBatches
from mixpipe.train.evaluate import IMAGENET_CROP_RATIO

SIZE, STRIDE, SIDE, FRAME = 32, 8, 64, 2
COLOURS = ((230, 20, 20), (20, 230, 20), (20, 20, 230))


def _framed(label: int) -> np.ndarray:
    """A SIDE px square: a grey gradient (the same in every image) in a FRAME px frame whose
    colour is the label."""
    ramp = np.linspace(60, 190, SIDE, dtype=np.float32)
    image = np.repeat(((ramp[:, None] + ramp[None, :]) / 2)[:, :, None], 3, axis=2)
    image = image.astype(np.uint8)
    image[:FRAME], image[-FRAME:], image[:, :FRAME], image[:, -FRAME:] = (COLOURS[label],) * 4
    return image


@pytest.fixture(scope="module")
def framed_tree(tmp_path_factory) -> str:
    from PIL import Image

    base = tmp_path_factory.mktemp("framing")
    for split, per_class in (("train", 2), ("val", 1)):
        for label in range(len(COLOURS)):
            folder = base / "src" / split / f"class{label}"
            os.makedirs(folder)
            for i in range(per_class):
                Image.fromarray(_framed(label)).save(folder / f"img{i}.png")
    out = str(base / "prepared")
    prepare_tree(str(base / "src"), out, workers=1, holdout=0.0, log=lambda _: None)
    return out


def _training_views(s: SpeedupSettings, dataset) -> torch.Tensor:
    """Every image as the torch arm's loader trains on it (a plan of singles), in id order."""
    loader = MixedLoader(dataset, FixedPlans(MixPlan.singles(len(dataset))), 4,
                         size=(s.image_size, s.image_size), stride=s.stride,
                         constituent_transform=constituent_transform(s))
    images = torch.empty(len(dataset), 3, s.image_size, s.image_size, dtype=torch.uint8)
    for batch in loader:
        images[batch.ids[:, 0]] = batch.image
    return images


def _eval_views(s: SpeedupSettings, dataset) -> torch.Tensor:
    batches = EvalBatches(dataset, batch_size=4, size=s.image_size, crop_ratio=s.crop_ratio)
    return torch.cat([images for images, _ in batches])


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
@pytest.mark.parametrize("augment", ["none", "flip"])
def test_whole_image_training_is_scored_on_whole_images(augment, loader):
    for data in ("some/prepared-tree", "fashion-mnist"):
        assert SpeedupSettings(data=data, augment=augment, loader=loader).crop_ratio == 1.0


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_crop_training_is_scored_on_the_centre_crop(loader):
    s = SpeedupSettings(data="some/prepared-tree", augment="crop", loader=loader)
    assert s.crop_ratio == pytest.approx(IMAGENET_CROP_RATIO)


def test_ffcv_crop_arm_trains_whole_images_so_is_scored_on_them():
    """The FFCV arm decodes whole images under every --augment (SimpleMixDecoder)."""
    assert SpeedupSettings(data="some/prepared-tree", augment="crop", loader="ffcv").crop_ratio \
        == 1.0


def test_an_explicit_ratio_wins():
    from mixpipe.bench.speedup.settings import eval_framing

    for augment in ("none", "crop"):
        s = SpeedupSettings(data="some/prepared-tree", augment=augment, eval_crop_ratio=0.6)
        assert s.crop_ratio == 0.6
        assert eval_framing(augment, "torch", 0.6) == 0.6


def test_evaluation_sees_the_training_view_of_a_tree(framed_tree):
    """A tree with --augment none: each scored image is the loader's training view of it, up to
    the two resize filters (pillow's and the reference composer's)."""
    s = SpeedupSettings(data=framed_tree, augment="none", image_size=SIZE, stride=STRIDE)
    dataset = FileListDataset(framed_tree, "train")
    trained, scored = _training_views(s, dataset), _eval_views(s, dataset)
    assert scored.shape == trained.shape
    assert (scored.int() - trained.int()).abs().max() <= 2


def test_a_border_decided_class_is_scored_as_trained(framed_tree):
    """Nearest class mean over training views, scored on held-out images' evaluation views: the
    frame must survive evaluation's framing (a 0.875 crop cuts it off, leaving every image
    alike, so one class wins everything)."""
    s = SpeedupSettings(data=framed_tree, augment="none", image_size=SIZE, stride=STRIDE)
    train, held = FileListDataset(framed_tree, "train"), FileListDataset(framed_tree, "test")
    views, labels = _training_views(s, train).float(), torch.as_tensor(train.labels)
    means = torch.stack([views[labels == c].mean(0) for c in range(len(COLOURS))])
    scored = _eval_views(s, held).float()
    predicted = torch.cdist(scored.flatten(1), means.flatten(1)).argmin(1)
    assert predicted.tolist() == list(held.labels)
