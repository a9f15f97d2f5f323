"""The torch loader's batched path: whole batches of slots built at once, same bytes as per item."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, default_collate

from mixpipe.core.augment import RandomResizedCropFlip
from mixpipe.core.compose import compose_slot, compose_slots, resize, resize_batch
from mixpipe.core.layouts import snap_weights
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.data import ArrayDataset
from mixpipe.torch import FixedPlans, MixedDataset, MixedLoader, SlotRef, collate_mixed
from mixpipe.torch.loader import BuiltBatch

KEYS = ("image", "targets", "weights", "ids", "layout", "loss_scale")


class Flip:
    """The speed-up benchmark's constituent transform: mirror with probability 1/2."""

    def __call__(self, image, region, rng):
        return image[:, ::-1] if rng.random() < 0.5 else image


class Pictures:
    """Generic map-style base: random pictures of several sizes (so constituents get resized)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shapes = [(32, 32), (40, 36), (24, 48)]
        self.images = [rng.integers(0, 256, shapes[i % 3] + (3,), dtype=np.uint8)
                       for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], (i * 3) % 7


def array_dataset(n: int, size: int = 32, seed: int = 1) -> ArrayDataset:
    """An ArrayDataset without a prepared directory: only its arrays matter to the loader."""
    rng = np.random.default_rng(seed)
    ds = ArrayDataset.__new__(ArrayDataset)
    ds.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ds.labels = rng.integers(0, 10, n).astype(np.int64)
    ds.classes = [str(c) for c in range(10)]
    ds.num_classes = 10
    return ds


def uneven_slots(n: int, seed: int, epoch: int = 0) -> list:
    """SlotRefs of every layout with uneven, grid-snapped weights, covering ids 0..n-1."""
    rng = np.random.default_rng(seed)
    rest = rng.permutation(n).tolist()
    slots = []
    while rest:
        layout = Layout(int(rng.integers(4)))
        k = {Layout.SINGLE: 1, Layout.HALVES: 2, Layout.QUADS: 4}.get(layout,
                                                                      int(rng.integers(2, 5)))
        if k > len(rest):
            layout, k = Layout.SINGLE, 1
        ids, rest = rest[:k], rest[k:]
        w = rng.dirichlet(np.full(k, 2.0))
        if layout in (Layout.HALVES, Layout.QUADS):
            w = snap_weights(layout, w, 4)
        w = np.asarray(w, np.float32)
        scale = np.round(rng.uniform(0.5, 2.0, k), 2).astype(np.float32)
        slots.append(SlotRef(epoch, tuple(ids), tuple(float(x) for x in w),
                             tuple(float(x) for x in scale), int(layout)))
    return slots


def assert_batch_equals_items(batch, items) -> None:
    want = collate_mixed(list(items))  # a plain list: stacked item by item
    for key in KEYS:
        got, exp = getattr(batch, key), getattr(want, key)
        assert got.dtype == exp.dtype, key
        torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------ core
@pytest.mark.parametrize("channels", [(3,), (1,), ()])
def test_resize_batch_equals_resize_per_image(channels) -> None:
    rng = np.random.default_rng(len(channels) * 10 + (channels[0] if channels else 0))
    for _ in range(40):
        h, w = rng.integers(1, 40, 2)
        height, width = rng.integers(1, 40, 2)
        images = rng.integers(0, 256, (int(rng.integers(1, 9)), h, w) + channels, np.uint8)
        if rng.random() < 0.5:
            images = images[:, :, ::-1]  # a flipped view, as the flip transform hands it over
        out = resize_batch(images, int(height), int(width))
        assert out.dtype == np.float32 and out.shape == (len(images), height, width) + channels
        for i, image in enumerate(images):
            np.testing.assert_array_equal(out[i], resize(image, int(height), int(width)))
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        resize_batch(np.zeros((4, 4), np.uint8), 2, 2)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("channels", [(3,), ()])
@pytest.mark.parametrize("one_size", [False, True])
def test_compose_slots_equals_compose_slot(seed, channels, one_size) -> None:
    rng = np.random.default_rng(seed)
    slots = uneven_slots(60, seed)
    sizes = [(32, 32)] * 4 if one_size else [(32, 32), (16, 24), (40, 28), (8, 8)]
    images = [[rng.integers(0, 256, sizes[int(rng.integers(4))] + channels, np.uint8)
               for _ in s.ids] for s in slots]
    # some constituents arrive as mirrored views, as a flip transform returns them
    images = [[img[:, ::-1] if rng.random() < 0.4 else img for img in row] for row in images]
    out = compose_slots(images, [s.weights for s in slots], [s.layout for s in slots],
                        (32, 32), 8)
    assert out.shape == (len(slots), 32, 32) + channels and out.dtype == np.uint8
    for row, slot in enumerate(slots):
        want = compose_slot(images[row], slot.weights, Layout(slot.layout), (32, 32), 8)
        np.testing.assert_array_equal(out[row], want, err_msg=f"slot {row} {slot}")


def test_compose_slots_refuses_bad_batches() -> None:
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="no slots"):
        compose_slots([], [], [], (8, 8))
    with pytest.raises(ValueError, match="one dtype and channel count"):
        compose_slots([[a], [a.astype(np.float32)]], [[1.0], [1.0]], [0, 0], (8, 8))
    with pytest.raises(ValueError, match="one dtype and channel count"):
        compose_slots([[a], [a[..., :1]]], [[1.0], [1.0]], [0, 0], (8, 8))
    with pytest.raises(ValueError, match="QUADS takes 4"):
        compose_slots([[a, a]], [[0.5, 0.5]], [Layout.QUADS], (8, 8))
    with pytest.raises(ValueError, match="2 slots but 1 weight rows"):
        compose_slots([[a], [a]], [[1.0]], [0, 0], (8, 8))


# ------------------------------------------------------------------------- torch dataset
BASES = {
    "arrays": lambda: array_dataset(70),
    "subset": lambda: Subset(array_dataset(90), list(range(89, 19, -1))),
    "generic": lambda: Pictures(70),
}
TRANSFORMS = {"none": None, "flip": Flip(), "crop": RandomResizedCropFlip()}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("base", sorted(BASES))
def test_batched_items_equal_per_item(base, transform) -> None:
    dataset = MixedDataset(BASES[base](), (32, 32), stride=8,
                           constituent_transform=TRANSFORMS[transform], seed=5)
    slots = uneven_slots(len(dataset), seed=len(base) + len(transform), epoch=3)
    assert {s.layout for s in slots} == {0, 1, 2, 3}
    for start in range(0, len(slots), 16):
        chunk = slots[start:start + 16]
        built = dataset.__getitems__(chunk)
        items = [dataset[s] for s in chunk]
        assert isinstance(built, BuiltBatch) and len(built) == len(chunk)
        assert_batch_equals_items(built.batch, items)
        # the items of the built batch are the same as well (for other collate functions)
        assert_batch_equals_items(built.batch, built)


@pytest.mark.parametrize("subset", [False, True])
def test_array_base_is_gathered_without_per_item_fetches(monkeypatch, subset) -> None:
    base = array_dataset(50)
    if subset:
        base = Subset(base, list(range(49, 9, -1)))
    dataset = MixedDataset(base, (32, 32), stride=8, constituent_transform=Flip())
    slots = uneven_slots(len(dataset), seed=9)
    items = [dataset[s] for s in slots]

    def refuse(self, i):
        raise AssertionError("per-item fetch on an array base")

    monkeypatch.setattr(ArrayDataset, "__getitem__", refuse)
    assert_batch_equals_items(dataset.__getitems__(slots).batch, items)


def test_batched_path_keeps_the_per_slot_seed() -> None:
    """A slot's pixels depend on (seed, epoch, ids) only, not on its batch neighbours."""
    dataset = MixedDataset(Pictures(40), (32, 32), stride=8,
                           constituent_transform=RandomResizedCropFlip(), seed=2)
    slots = uneven_slots(40, seed=4, epoch=1)
    whole = dataset.__getitems__(slots).batch.image
    shuffled = [slots[i] for i in range(len(slots) - 1, -1, -1)]
    reversed_batch = dataset.__getitems__(shuffled).batch.image
    torch.testing.assert_close(reversed_batch.flip(0), whole, rtol=0, atol=0)
    later = dataset.__getitems__([SlotRef(2, s.ids, s.weights, s.loss_scale, s.layout)
                                  for s in slots]).batch.image
    assert not torch.equal(later, whole)  # another epoch draws other crops


@pytest.mark.parametrize("seed", [0, 7, 2**40])
def test_transform_draws_from_the_slot_seeded_generator(seed) -> None:
    """Both paths hand the transform np.random.default_rng([seed, epoch, *ids]), in slot order."""
    draws: list = []

    def record(image, region, rng):
        draws.append(rng.random())
        return image

    dataset = MixedDataset(Pictures(30), (32, 32), stride=8, constituent_transform=record,
                           seed=seed)
    slots = uneven_slots(30, seed=3, epoch=4)
    dataset.__getitems__(slots)
    batched, draws[:] = list(draws), []
    for slot in slots:
        dataset[slot]
    want = np.concatenate([np.random.default_rng([seed, 4, *s.ids]).random(len(s.ids))
                           for s in slots])
    np.testing.assert_array_equal(batched, want)
    np.testing.assert_array_equal(draws, want)


def test_default_collate_still_works_on_built_batches() -> None:
    dataset = MixedDataset(Pictures(20), (32, 32), stride=8)
    slots = uneven_slots(20, seed=1)
    built = dataset.__getitems__(slots)
    plain = default_collate(list(built))
    for key in KEYS:
        torch.testing.assert_close(plain[key], getattr(built.batch, key), rtol=0, atol=0)
    loader = DataLoader(dataset, batch_size=4, sampler=slots, collate_fn=collate_mixed)
    assert torch.equal(torch.cat([b.ids for b in loader]), built.batch.ids)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_equal_per_item_composites(num_workers) -> None:
    n = 60
    base = array_dataset(n)
    slots = uneven_slots(n, seed=7)
    plan = MixPlan.from_slots([(list(s.ids), list(s.weights), Layout(s.layout)) for s in slots],
                              n).validate()
    loader = MixedLoader(base, FixedPlans(plan), batch_size=8, size=(32, 32), stride=8,
                         num_workers=num_workers, constituent_transform=Flip(), seed=3)
    loader.set_epoch(0)
    reference = MixedDataset(base, (32, 32), stride=8, constituent_transform=Flip(), seed=3)
    order = list(loader.sampler)
    batches = list(loader)
    assert len(batches) == len(loader)
    for i, batch in enumerate(batches):
        assert_batch_equals_items(batch, [reference[s] for s in order[8 * i:8 * i + 8]])


def test_bad_indices_are_refused_clearly() -> None:
    dataset = MixedDataset(array_dataset(10), (32, 32), stride=8)
    slot = SlotRef(0, (1,), (1.0,), (1.0,), int(Layout.SINGLE))
    with pytest.raises(TypeError, match="indexed by SlotRef .* got int"):
        dataset.__getitems__([slot, 3])
    with pytest.raises(ValueError, match="max_constituents"):
        dataset.__getitems__([SlotRef(0, (0, 1, 2, 3, 4), (0.2,) * 5, (1.0,) * 5,
                                      int(Layout.BLEND))])
    with pytest.raises(IndexError, match="sample id 10 out of range"):
        dataset.__getitems__([SlotRef(0, (10,), (1.0,), (1.0,), int(Layout.SINGLE))])
    with pytest.raises(ValueError, match="no slots"):
        dataset.__getitems__([])


def test_batch_fields_share_one_storage_without_overlapping() -> None:
    """One storage per batch (one handover from a worker); the fields must not alias."""
    dataset = MixedDataset(array_dataset(12), (32, 32), stride=8)
    batch = dataset.__getitems__(uneven_slots(12, seed=2)).batch
    pointers = {field.untyped_storage().data_ptr() for field in batch}
    assert len(pointers) == 1
    before = {key: getattr(batch, key).clone() for key in KEYS}
    for key in KEYS:
        getattr(batch, key).fill_(7)
        for other in KEYS:
            if other != key:
                assert torch.equal(getattr(batch, other), before[other]), (key, other)
        getattr(batch, key).copy_(before[key])
