"""The FFCV adapter: composites equal the reference composer, plans drive epochs exactly.

Compiled FFCV loaders cost seconds of numba compilation each, so the loaders are module-scoped
and shared; a scripted plan provider lets every test choose the plan of the epoch it runs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

ffcv = pytest.importorskip("ffcv")

from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from mixpipe.core.compose import compose_slot  # noqa: E402
from mixpipe.core.layouts import regions  # noqa: E402
from mixpipe.core.plan import Layout, MixPlan  # noqa: E402
from mixpipe.ffcv import (MixLabelDecoder, MixLoader, RandomResizedCropMixDecoder,  # noqa: E402
                          SimpleMixDecoder)
from mixpipe.ffcv import geometry  # noqa: E402

# numba's dispatcher finaliser raises KeyError when FFCV's per-loader imdecode dispatchers are
# garbage-collected (ffcv compiles a fresh one per loader); harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N = 48
SIZE = 32
STRIDE = 8


def textured(i: int) -> np.ndarray:
    """A JPEG-worthy image: gradients, a checker and noise, different per sample."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([(x * 7 + i * 11) % 256, (y * 5 + i * 3) % 256,
                    ((x // 4 + y // 4) % 2) * 160 + 40], axis=-1).astype(np.float64)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def id_coloured(i: int) -> np.ndarray:
    """Flat colour that survives JPEG: the id in 16-level steps of red and green."""
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    img[..., 0] = 16 * (i % 16) + 8
    img[..., 1] = 16 * (i // 16) + 8
    return img


def read_id(pixel: np.ndarray) -> int:
    return int(round((float(pixel[0]) - 8) / 16)) + 16 * int(round((float(pixel[1]) - 8) / 16))


class _Images:
    def __init__(self, make):
        self.make = make

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.make(i), (i * 7) % 10


def write_beton(path, make) -> str:
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                       "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(_Images(make))
    return str(path)


class ScriptedPlans:
    """Plan provider whose next plan the test sets; counts how often each epoch is fetched."""

    def __init__(self):
        self.next = MixPlan.singles(N)
        self.calls: dict = {}

    def plan(self, epoch, rank=0, world_size=1):
        self.calls[epoch] = self.calls.get(epoch, 0) + 1
        p = self.next
        return MixPlan(p.ids, p.weights, p.loss_scale, p.layout, p.skipped, p.num_samples,
                       epoch, p.seed, rank, world_size)


def mixed_plan(seed: int, n_skip: int = 3, k_blend: int = 3) -> MixPlan:
    """Every layout, random weights (snapped or not), some skipped ids."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(N).tolist()
    skipped, rest = order[:n_skip], order[n_skip:]
    slots = []
    cycle = [Layout.HALVES, Layout.QUADS, Layout.BLEND, Layout.SINGLE, Layout.BLEND]
    i = 0
    while rest:
        layout = cycle[i % len(cycle)]
        i += 1
        k = {Layout.SINGLE: 1, Layout.HALVES: 2, Layout.QUADS: 4,
             Layout.BLEND: 2 if i % 2 else k_blend}[layout]
        if k > len(rest):
            layout, k = Layout.SINGLE, 1
        ids, rest = rest[:k], rest[k:]
        w = rng.dirichlet(np.ones(k)).astype(np.float32) if k > 1 else np.ones(1, np.float32)
        w[-1] = np.float32(1.0) - w[:-1].sum(dtype=np.float32)
        slots.append((ids, w.tolist(), layout))
    return MixPlan.from_slots(slots, N, skipped=skipped, seed=seed).validate()


def plain_decoded(path: str) -> tuple:
    """Every image decoded by FFCV's own decoder, in id order: the reference's constituents."""
    loader = Loader(path, batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for img, lab in loader:
        images.append(np.array(img))
        labels.append(np.array(lab).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def run_epoch(loader: MixLoader):
    batches = list(loader)
    return ([np.asarray(b.image.permute(0, 2, 3, 1)) for b in batches],
            [b for b in batches])


def cat(batches, field):
    return np.concatenate([np.asarray(getattr(b, field)) for b in batches])


def reference(decoded, plan: MixPlan, row: int, size=(SIZE, SIZE), crops=None) -> np.ndarray:
    ids, weights, _, layout = plan.slot(row)
    parts = []
    for c, sample in enumerate(ids):
        img = decoded[sample]
        if crops is not None:
            top, left, h, w, flip = crops[row, c]
            img = img[top:top + h, left:left + w]
            if flip:
                img = img[:, ::-1]
        parts.append(img)
    return compose_slot(parts, weights.tolist(), layout, size=size, stride=STRIDE)


def assert_close_to_reference(got: np.ndarray, want: np.ndarray, where: str) -> None:
    """Bit-exact except float32 summation-order ties: at most 1 level, on few pixels."""
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= 1, f"{where}: max difference {diff.max()}"
    assert (diff > 0).mean() <= 0.01, f"{where}: {(diff > 0).mean():.3%} pixels differ"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def textured_beton(tmp_path_factory):
    path = write_beton(tmp_path_factory.mktemp("ffcv") / "textured.beton", textured)
    decoded, labels = plain_decoded(path)
    return path, decoded, labels


@pytest.fixture(scope="module")
def simple_loader(textured_beton):
    plans = ScriptedPlans()
    loader = MixLoader(textured_beton[0], 8, plans, num_workers=1, pipelines={
        "image": [SimpleMixDecoder(stride=STRIDE)],
        "label": [MixLabelDecoder(), ToTensor()]})
    return loader, plans


# ------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_composites_equal_reference_compose_for_every_layout(simple_loader, textured_beton):
    loader, plans = simple_loader
    _, decoded, labels = textured_beton
    plans.next = mixed_plan(seed=1)
    images, batches = run_epoch(loader)
    plan = loader.plan
    got = np.concatenate(images)
    assert got.shape == (plan.num_slots, SIZE, SIZE, 3)
    assert set(plan.layout.tolist()) == {int(v) for v in Layout}
    for row in range(plan.num_slots):
        assert_close_to_reference(got[row], reference(decoded, plan, row),
                                  f"slot {row} {Layout(int(plan.layout[row])).name}")
    np.testing.assert_array_equal(cat(batches, "ids"), plan.ids)
    np.testing.assert_array_equal(cat(batches, "weights"), plan.weights)
    np.testing.assert_array_equal(cat(batches, "layout"), plan.layout)
    np.testing.assert_array_equal(cat(batches, "loss_scale"), plan.loss_scale)
    want_targets = np.where(plan.ids >= 0, labels[np.maximum(plan.ids, 0)], -1)
    np.testing.assert_array_equal(cat(batches, "targets"), want_targets)


@pytest.mark.slow
def test_each_epoch_covers_every_id_once_and_len_follows_the_plan(simple_loader):
    loader, plans = simple_loader
    # fewer slots than singles, then MORE slots than the epoch before, then fewer again
    script = [mixed_plan(seed=2),
              MixPlan.singles(N, order=np.random.default_rng(3).permutation(N)),
              mixed_plan(seed=4, n_skip=9)]
    plans.next = script[0]
    for i, plan in enumerate(script):
        expected_batches = -(-plan.num_slots // loader.batch_size)
        # asked between epochs: len() speaks about the coming epoch's plan
        assert len(loader) == expected_batches
        batches = []
        for batch in loader:
            assert len(loader) == expected_batches  # and about the running epoch during it
            batches.append(batch)
        assert len(batches) == expected_batches
        ids = cat(batches, "ids")
        assert ids.shape[0] == plan.num_slots  # nothing cut to epoch 0's length
        seen = np.concatenate([ids[ids >= 0], plan.skipped])
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))
        np.testing.assert_array_equal(ids, plan.ids)
        if i + 1 < len(script):
            plans.next = script[i + 1]


@pytest.mark.slow
def test_abandoned_epoch_does_not_leak_into_the_next(simple_loader):
    loader, plans = simple_loader
    plans.next = MixPlan.singles(N)
    run = iter(loader)
    next(run)  # leave the epoch after one batch
    plans.next = mixed_plan(seed=5)
    batches = list(loader)
    np.testing.assert_array_equal(cat(batches, "ids"), plans.next.ids)


@pytest.mark.slow
def test_random_resized_crops_match_reference_and_stay_in_bounds(textured_beton):
    path, decoded, _ = textured_beton
    plans = ScriptedPlans()
    decoder = RandomResizedCropMixDecoder((24, 40), scale=(0.3, 1.0), stride=STRIDE,
                                          flip_prob=0.5)
    loader = MixLoader(path, 16, plans, num_workers=1, pipelines={
        "image": [decoder], "label": [MixLabelDecoder(), ToTensor()]})
    plans.next = mixed_plan(seed=6)
    images, _ = run_epoch(loader)
    plan = loader.plan
    got = np.concatenate(images)
    crops = decoder.crops.copy()
    present = plan.ids >= 0
    c = crops[:plan.num_slots][present]
    assert (c[:, 0] >= 0).all() and (c[:, 1] >= 0).all() and (c[:, 2] >= 1).all()
    assert (c[:, 0] + c[:, 2] <= SIZE).all() and (c[:, 1] + c[:, 3] <= SIZE).all()
    assert 0 < c[:, 4].mean() < 1  # some flipped, some not
    for row in range(plan.num_slots):
        assert_close_to_reference(got[row], reference(decoded, plan, row, (24, 40), crops),
                                  f"slot {row}")
    # the same plan gives the same crops (seeded by plan seed and epoch), a new epoch new ones
    first = crops[:plan.num_slots].copy()
    loader.tables.load(plan)
    np.testing.assert_array_equal(decoder.crops[:plan.num_slots], first)


@pytest.mark.slow
def test_fast_resize_mode_stays_close_to_the_reference(textured_beton):
    """resize="fast" (FFCV's OpenCV INTER_AREA) is not the reference filter: bounded drift."""
    path, decoded, labels = textured_beton
    plans = ScriptedPlans()
    decoder = RandomResizedCropMixDecoder((24, 40), scale=(0.3, 1.0), stride=STRIDE,
                                          flip_prob=0.5, resize="fast")
    loader = MixLoader(path, 16, plans, num_workers=1, pipelines={
        "image": [decoder], "label": [MixLabelDecoder(), ToTensor()]})
    plans.next = mixed_plan(seed=12)
    images, batches = run_epoch(loader)
    plan = loader.plan
    got = np.concatenate(images).astype(np.int64)
    want = np.stack([reference(decoded, plan, row, (24, 40), decoder.crops)
                     for row in range(plan.num_slots)]).astype(np.int64)
    assert np.abs(got - want).mean() < 2.0
    np.testing.assert_array_equal(cat(batches, "ids"), plan.ids)
    with pytest.raises(ValueError, match="resize must be"):
        SimpleMixDecoder(resize="cubic")


@pytest.fixture(scope="module")
def coloured_beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("ffcv") / "coloured.beton", id_coloured)


@pytest.mark.slow
def test_labels_and_ids_are_aligned_with_pixels(coloured_beton):
    plans = ScriptedPlans()
    loader = MixLoader(coloured_beton, 8, plans, num_workers=1, os_cache=False, pipelines={
        "image": [SimpleMixDecoder(stride=STRIDE), ToTensor(), ToTorchImage(channels_last=False)],
        "label": [MixLabelDecoder(), ToTensor()]})
    for seed in (7, 8):
        plans.next = mixed_plan(seed=seed)
        for batch in loader:
            image = np.asarray(batch.image.permute(0, 2, 3, 1))
            for b in range(image.shape[0]):
                n = int((batch.ids[b] >= 0).sum())
                ids = batch.ids[b, :n].numpy()
                layout = Layout(int(batch.layout[b]))
                np.testing.assert_array_equal(batch.targets[b, :n].numpy(), (ids * 7) % 10)
                if layout == Layout.BLEND:
                    continue  # a blend has no pixel of its own per constituent
                regs = regions(layout, batch.weights[b, :n].tolist(), SIZE, SIZE, STRIDE)
                for sample, reg in zip(ids, regs):
                    centre = image[b, reg.top + reg.height // 2, reg.left + reg.width // 2]
                    assert read_id(centre) == sample


@pytest.mark.slow
def test_compiler_disabled_gives_the_same_results(simple_loader, textured_beton):
    loader, plans = simple_loader
    plan = mixed_plan(seed=9)
    plans.next = plan
    compiled_images, compiled_batches = run_epoch(loader)
    Compiler.set_enabled(False)
    try:
        py_plans = ScriptedPlans()
        py_plans.next = plan
        py_loader = MixLoader(textured_beton[0], 8, py_plans, num_workers=1, pipelines={
            "image": [SimpleMixDecoder(stride=STRIDE)],
            "label": [MixLabelDecoder(), ToTensor()]})
        py_images, py_batches = run_epoch(py_loader)
    finally:
        Compiler.set_enabled(True)
    np.testing.assert_array_equal(np.concatenate(py_images), np.concatenate(compiled_images))
    for field in ("targets", "weights", "ids", "layout", "loss_scale"):
        np.testing.assert_array_equal(cat(py_batches, field), cat(compiled_batches, field))


@pytest.mark.slow
def test_ffcv_transforms_run_after_the_mixing_decoder(textured_beton, simple_loader):
    path = textured_beton[0]
    plans = ScriptedPlans()
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([50.0, 60.0, 70.0])
    loader = MixLoader(path, 8, plans, num_workers=1, pipelines={
        # on the CPU NormalizeImage is a compiled (numpy) stage, so it comes before ToTensor
        "image": [SimpleMixDecoder(stride=STRIDE), RandomHorizontalFlip(1.0),
                  NormalizeImage(mean, std, np.float32), ToTensor(),
                  ToTorchImage(channels_last=False)],
        "label": [MixLabelDecoder(), ToTensor()]})
    plan = mixed_plan(seed=10)
    plans.next = plan
    got = np.concatenate([np.asarray(b.image) for b in loader])
    base_loader, base_plans = simple_loader
    base_plans.next = plan
    plain = np.concatenate(run_epoch(base_loader)[0])
    want = ((plain[:, :, ::-1, :].astype(np.float64) - mean) / std).astype(np.float32)
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_fields_without_a_mixing_decoder_are_refused(textured_beton):
    with pytest.raises(ValueError, match="'label' has no pipeline"):
        MixLoader(textured_beton[0], 8, ScriptedPlans(),
                  pipelines={"image": [SimpleMixDecoder()]})
    with pytest.raises(ValueError, match="not a mixpipe decoder"):
        MixLoader(textured_beton[0], 8, ScriptedPlans(),
                  pipelines={"image": [SimpleMixDecoder()], "label": [IntDecoder()]})
    with pytest.raises(ValueError, match="cannot decode the IntField"):
        MixLoader(textured_beton[0], 8, ScriptedPlans(),
                  pipelines={"image": [SimpleMixDecoder()], "label": [SimpleMixDecoder()]})


@pytest.mark.slow
def test_plans_that_do_not_fit_are_refused(simple_loader):
    loader, plans = simple_loader
    plans.next = MixPlan.singles(N + 1)
    with pytest.raises(ValueError, match="covers 49 samples"):
        iter(loader)
    wide = MixPlan.from_slots([(list(range(5)), [0.2] * 5, Layout.BLEND)] +
                              [([i], [1.0], Layout.SINGLE) for i in range(5, N)], N)
    plans.next = wide
    with pytest.raises(ValueError, match="max_constituents=4"):
        iter(loader)
    plans.next = MixPlan.singles(N)  # leave the shared loader usable


@pytest.mark.slow
def test_an_unreachable_server_gives_an_unmixed_epoch(simple_loader):
    loader, plans = simple_loader

    class Down:
        def plan(self, epoch, rank=0, world_size=1):
            raise ConnectionError("no server")

    loader.source = Down()
    try:
        with pytest.warns(RuntimeWarning, match="without mixing"):
            batches = list(loader)
    finally:
        loader.source = plans
    np.testing.assert_array_equal(cat(batches, "ids"), np.arange(N)[:, None])


@pytest.mark.slow
def test_a_decoder_serves_one_loader_only(simple_loader, textured_beton):
    loader, _ = simple_loader
    decoder = loader.ffcv.pipeline_specs["image"].decoder
    with pytest.raises(ValueError, match="another MixLoader"):
        MixLoader(textured_beton[0], 8, ScriptedPlans(),
                  pipelines={"image": [decoder], "label": [MixLabelDecoder()]})


def test_compiled_filter_taps_are_the_core_definition_bit_for_bit():
    from mixpipe.core.filter import filter_taps
    from mixpipe.ffcv.kernels import _taps

    for src, dst in [(28, 16), (16, 32), (7, 3), (375, 224), (512, 112), (1000, 7)]:
        for got, want in zip(_taps(src, dst), filter_taps(src, dst)):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------- geometry
def test_region_tables_equal_core_regions():
    plan = mixed_plan(seed=11)
    table = np.zeros((N, 4, 4), np.int32)
    geometry.fill_regions(plan, table, 48, 40, STRIDE)
    for row in range(plan.num_slots):
        ids, weights, _, layout = plan.slot(row)
        want = [[r.top, r.left, r.height, r.width]
                for r in regions(layout, weights.tolist(), 48, 40, STRIDE)]
        np.testing.assert_array_equal(table[row, :len(ids)], want)
        assert (table[row, len(ids):] == 0).all()


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), rh=st.integers(1, 64),
       rw=st.integers(1, 64), lo=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_random_crops_stay_inside_the_image(h, w, rh, rw, lo, seed):
    rng = np.random.default_rng(seed)
    n = 5
    crops = geometry.random_resized_crops(np.full(n, h), np.full(n, w), np.full(n, rh),
                                          np.full(n, rw), rng, scale=(lo, 1.0))
    top, left, ch, cw = crops.T
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    centre = geometry.center_crops(np.full(n, h), np.full(n, w), np.full(n, rh), np.full(n, rw),
                                   rng, 0.875)
    top, left, ch, cw = centre.T
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()


# --------------------------------------------------------------------------------- presets
def test_settings_refuse_bad_values_naming_the_field():
    from mixpipe.ffcv.presets import FFCVSettings

    with pytest.raises(ValueError, match="FFCVSettings.stride"):
        FFCVSettings(size=(32, 32), stride=32)
    with pytest.raises(ValueError, match="FFCVSettings.scale"):
        FFCVSettings(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="FFCVSettings.resize"):
        FFCVSettings(resize="cubic")


def test_unmixed_plans_cover_every_id_on_every_rank_count():
    from mixpipe.ffcv.presets import UnmixedPlans

    for world in (1, 2, 3):
        shards = [UnmixedPlans(10).plan(4, r, world) for r in range(world)]
        assert len({s.num_slots for s in shards}) == 1
        real = np.concatenate([s.ids[s.loss_scale > 0] for s in shards])
        np.testing.assert_array_equal(np.sort(real), np.arange(10))
        assert all(s.epoch == 4 for s in shards)


def test_tree_ids_follow_sorted_class_folders(tmp_path):
    from PIL import Image

    from mixpipe.ffcv.presets import _TreeImages

    for cls, names in (("b_cls", ["2.jpg", "1.jpg"]), ("a_cls", ["9.jpg"])):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for n in names:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / cls / n)
    ds = _TreeImages(str(tmp_path), "train")
    assert [os.path.relpath(p, tmp_path) for p in ds.paths] == [
        "train/a_cls/9.jpg", "train/b_cls/1.jpg", "train/b_cls/2.jpg"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert ds[0][0].shape == (4, 4, 3)
