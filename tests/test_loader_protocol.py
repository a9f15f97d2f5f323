"""The torch, DALI and FFCV loaders all meet :class:`mixpipe.core.loader.PlanLoader`.

One test body drives each loader through two epochs whose plans differ in slot count, exactly as
``fit`` drives it, and checks what the protocol promises: the plan returned is the one served,
``len()`` counts the epoch's batches, the batches deliver every planned slot once, and ``close()``
may be called twice.
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from mixpipe.core.batch import MixedBatch
from mixpipe.core.loader import PlanLoader
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.core.source import FixedPlans

N, SIZE, STRIDE, BATCH = 12, 32, 8, 4


def pixels(i: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 10 * i + 5, np.uint8)


class Items:
    """``items[i] -> (uint8 HWC image, label)``, what the torch loader and FFCV's writer read."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return pixels(i), i % 3


def plans() -> FixedPlans:
    """Epoch 0 mixes (8 slots), epoch 1 does not (12 slots): len() must follow the plan."""
    mixed = MixPlan.from_slots([([0, 1], [0.5, 0.5], Layout.HALVES),
                                ([2, 3, 4, 5], [0.25] * 4, Layout.QUADS),
                                ([6, 7], [0.75, 0.25], Layout.BLEND)] +
                               [([i], [1.0], Layout.SINGLE) for i in range(8, N - 1)],
                               N, skipped=[N - 1])
    return FixedPlans(mixed.validate(), MixPlan.singles(N))


def torch_loader(source, tmp_path):
    from mixpipe.torch import MixedLoader

    return MixedLoader(Items(), source, BATCH, (SIZE, SIZE), stride=STRIDE)


def dali_loader(source, tmp_path):
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from mixpipe.dali import FixedView, InMemoryImages
    from mixpipe.dali.pipeline import PipelineSettings, make_train_loader

    encoded = []
    for i in range(N):
        out = io.BytesIO()
        Image.fromarray(pixels(i)).save(out, format="PNG")
        encoded.append(out.getvalue())
    settings = PipelineSettings(size=(SIZE, SIZE), stride=STRIDE)
    return make_train_loader(InMemoryImages(encoded, np.arange(N) % 3), settings, BATCH, source,
                             device_id=None, num_threads=1, py_num_workers=0,
                             view=FixedView())


def ffcv_loader(source, tmp_path):
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    from mixpipe.ffcv import MixLabelDecoder, MixLoader, SimpleMixDecoder

    path = str(tmp_path / "tiny.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Items())
    return MixLoader(path, BATCH, source, num_workers=1, pipelines={
        "image": [SimpleMixDecoder(stride=STRIDE)], "label": [MixLabelDecoder(), ToTensor()]})


LOADERS = [pytest.param(torch_loader, id="torch"),
           pytest.param(dali_loader, id="dali", marks=pytest.mark.slow),
           pytest.param(ffcv_loader, id="ffcv", marks=pytest.mark.slow)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba, ffcv
@pytest.mark.parametrize("make", LOADERS)
def test_loader_meets_the_protocol(make, tmp_path):
    source = plans()
    loader = make(source, tmp_path)
    try:
        assert isinstance(loader, PlanLoader)
        assert loader.source is source
        for epoch in range(2):
            plan = loader.set_epoch(epoch)
            want = source.plan(epoch)
            assert isinstance(plan, MixPlan) and plan.epoch == epoch
            np.testing.assert_array_equal(plan.ids, want.ids)  # as served, not padded
            expected = -(-want.num_slots // BATCH)
            assert len(loader) == expected
            batches = list(loader)
            assert len(batches) == expected
            assert all(isinstance(b, MixedBatch) for b in batches)
            assert batches[0].image.shape[1:] == (3, SIZE, SIZE)
            real = np.concatenate([b.loss_scale.numpy()[:, 0] > 0 for b in batches])
            ids = np.concatenate([b.ids.numpy() for b in batches])[real]
            assert sorted(map(tuple, ids[:, :want.ids.shape[1]].tolist())) == \
                sorted(map(tuple, want.ids.tolist()))
            layouts = np.concatenate([b.layout.numpy() for b in batches])[real]
            assert sorted(layouts.tolist()) == sorted(want.layout.tolist())
    finally:
        loader.close()
    loader.close()
