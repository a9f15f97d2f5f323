"""The torch adapter: every sample once per epoch, labels and ids aligned with pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixpipe.core.augment import RandomResizedCropFlip, random_resized_crop_box
from mixpipe.core.compose import compose_slot
from mixpipe.core.layouts import regions
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.torch import FixedPlans, MixedLoader, SlotRef


class IdColouredImages:
    """Sample i is a flat image whose red channel is i % 256 and green i // 256: pixels carry ids."""

    def __init__(self, n: int, size: int = 32) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = np.zeros((self.size, self.size, 3), np.uint8)
        img[..., 0] = i % 256
        img[..., 1] = i // 256
        img[..., 2] = 255
        return img, (i * 7) % 10


def random_plan(n: int, seed: int, epoch: int = 0) -> MixPlan:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n).tolist()
    skipped, rest = order[:5], order[5:]
    slots = []
    while rest:
        layout = [Layout.SINGLE, Layout.HALVES, Layout.QUADS, Layout.BLEND][int(rng.integers(4))]
        k = {Layout.SINGLE: 1, Layout.HALVES: 2, Layout.QUADS: 4, Layout.BLEND: 2}[layout]
        if k > len(rest):
            layout, k = Layout.SINGLE, 1
        ids, rest = rest[:k], rest[k:]
        w = {1: [1.0], 2: [0.25, 0.75], 4: [0.25] * 4}[k]
        slots.append((ids, w, layout))
    return MixPlan.from_slots(slots, n, skipped=skipped, epoch=epoch, seed=seed).validate()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch_and_pixels_match_ids(num_workers) -> None:
    n = 90
    plans = [random_plan(n, seed=s) for s in (1, 2)]
    loader = MixedLoader(IdColouredImages(n), FixedPlans(*plans), batch_size=8, size=(32, 32),
                         stride=8, num_workers=num_workers, persistent_workers=True)
    for epoch, plan in enumerate(plans):
        loader.set_epoch(epoch)
        assert len(loader) == -(-plan.num_slots // 8)
        seen, batches = [], 0
        for batch in loader:
            batches += 1
            for b in range(batch.image.shape[0]):
                layout = Layout(int(batch.layout[b]))
                k = int((batch.ids[b] >= 0).sum())
                ids = batch.ids[b, :k].tolist()
                seen.extend(ids)
                assert batch.targets[b, :k].tolist() == [(i * 7) % 10 for i in ids]
                img = batch.image[b].permute(1, 2, 0).numpy()
                if layout == Layout.BLEND:
                    w = batch.weights[b, :k].numpy()
                    red = np.floor(sum(wi * (i % 256) for wi, i in zip(w, ids)) + 0.5)
                    assert abs(int(img[0, 0, 0]) - red) <= 1
                    continue
                for i, reg in zip(ids, regions(layout, batch.weights[b, :k].tolist(), 32, 32, 8)):
                    patch = img[reg.slices]
                    assert (patch[..., 0] == i % 256).all() and (patch[..., 1] == i // 256).all()
        assert batches == len(loader)
        assert sorted(seen + plan.skipped.tolist()) == list(range(n))


def test_composites_equal_reference_compose() -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(6)]

    class Base:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return images[i], i

    plan = MixPlan.from_slots([([0, 1], [0.75, 0.25], Layout.HALVES),
                               ([2, 3, 4, 5], [0.25] * 4, Layout.QUADS)], 6).validate()
    loader = MixedLoader(Base(), FixedPlans(plan), batch_size=2, size=(32, 32), stride=8,
                         shuffle=False)
    batch = next(iter(loader))
    for b, (ids, w, layout) in enumerate([([0, 1], [0.75, 0.25], Layout.HALVES),
                                          ([2, 3, 4, 5], [0.25] * 4, Layout.QUADS)]):
        want = compose_slot([images[i] for i in ids], w, layout, (32, 32), 8)
        np.testing.assert_array_equal(batch.image[b].permute(1, 2, 0).numpy(), want)


def test_sharded_loaders_cover_the_plan() -> None:
    n = 50
    plan = random_plan(n, seed=4)
    seen = []
    lengths = set()
    for rank in range(3):
        loader = MixedLoader(IdColouredImages(n), FixedPlans(plan), batch_size=4, size=(32, 32),
                             stride=8, rank=rank, world_size=3)
        loader.set_epoch(0)
        lengths.add(len(loader))
        for batch in loader:
            real = (batch.ids >= 0) & (batch.loss_scale > 0)
            seen.extend(batch.ids[real].tolist())
    assert len(lengths) == 1
    assert sorted(seen + plan.skipped.tolist()) == list(range(n))


def test_unreachable_source_falls_back_to_singles_with_one_warning() -> None:
    class Down:
        def plan(self, epoch, rank=0, world_size=1):
            raise ConnectionError("selection server not listening")

    loader = MixedLoader(IdColouredImages(12), Down(), batch_size=5, size=(32, 32))
    with pytest.warns(RuntimeWarning, match="without mixing"):
        loader.set_epoch(0)
    assert (loader.plan.layout == Layout.SINGLE).all() and loader.plan.num_slots == 12
    ids = torch.cat([b.ids[:, 0] for b in loader]).tolist()
    assert sorted(ids) == list(range(12))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failing epoch must stay quiet
        loader.set_epoch(1)
    assert loader.plan.epoch == 1


def test_plan_for_another_dataset_is_refused() -> None:
    loader = MixedLoader(IdColouredImages(12), FixedPlans(MixPlan.singles(13)), batch_size=4,
                         size=(32, 32))
    with pytest.raises(ValueError, match="plan covers 13 samples but the dataset has 12"):
        loader.set_epoch(0)


def test_dataset_is_indexed_by_slot_refs_only() -> None:
    loader = MixedLoader(IdColouredImages(4), FixedPlans(MixPlan.singles(4)), batch_size=2,
                         size=(32, 32))
    with pytest.raises(TypeError, match="indexed by SlotRef"):
        loader.dataset[0]
    slot = SlotRef(0, (0, 1, 2, 3, 0), (0.2,) * 5, (1.0,) * 5, int(Layout.BLEND))
    with pytest.raises(ValueError, match="max_constituents"):
        loader.dataset[slot]


def test_random_resized_crop_is_seeded_and_fits_region() -> None:
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = RandomResizedCropFlip()
    a = transform(image, (32, 8), np.random.default_rng(9))
    b = transform(image, (32, 8), np.random.default_rng(9))
    assert a.shape == (32, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    for seed in range(50):
        top, left, h, w = random_resized_crop_box(20, 30, (0.1, 1.0), (0.5, 2.0),
                                                  np.random.default_rng(seed))
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30 and h > 0 and w > 0
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropFlip(scale=(0.0, 1.0))


@pytest.mark.slow
def test_close_ends_persistent_workers():
    import multiprocessing

    before = set(multiprocessing.active_children())  # other tests' leftovers are not ours
    loader = MixedLoader(IdColouredImages(16), FixedPlans(MixPlan.singles(16)), 8, (32, 32),
                         num_workers=1, persistent_workers=True)
    loader.set_epoch(0)
    assert len(list(loader)) == 2
    ours = set(multiprocessing.active_children()) - before
    assert ours  # the persistent worker outlives the epoch
    loader.close()
    for worker in ours:
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in ours)
    loader.close()  # again: nothing left to do
