"""mixpipe.dali on CPU-only DALI (device_id=None): composites, epochs, alignment, fallback."""
from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("nvidia.dali")
from PIL import Image  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

from mixpipe import dali as mxd  # noqa: E402
from mixpipe.core.compose import compose_slot  # noqa: E402
from mixpipe.core.layouts import regions  # noqa: E402
from mixpipe.core.plan import Layout, MixPlan  # noqa: E402
from mixpipe.dali import (FileList, FixedPlans, FixedView, InMemoryImages,  # noqa: E402
                          MixIterator, PlanBoard, PlanNotPublished, SlotSource, RandomView, close_pipeline,
                          epoch_walk, image_size, mix, plan_inputs)


# ----------------------------------------------------------------------------- helpers
def jpeg(image: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 so that PIL and DALI (both libjpeg-turbo) decode to identical pixels
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0, **kw)
    return buf.getvalue()


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    a, b, c = np.random.default_rng(seed).uniform(0.5, 3.0, 3)
    img = np.stack([127 + 120 * np.sin(x / w * a * 3 + y / h * b),
                    127 + 120 * np.cos(y / h * c * 3),
                    (x * 255 // w + seed * 40) % 256], axis=-1)
    return img.astype(np.uint8)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def id_colour(i: int) -> np.ndarray:
    """A colour per id, far enough from every other id's to be read back after JPEG."""
    return np.array([20 + 9 * i, 235 - 9 * i, (60 + 97 * i) % 256], np.float64)


def id_images(n: int, size=(24, 24)) -> list:
    return [jpeg(np.broadcast_to(id_colour(i).astype(np.uint8), size + (3,)).copy())
            for i in range(n)]


def run_raw(source: SlotSource, walk: MixPlan, batch_size: int, parallel: bool = False):
    """Run one round of a raw (un-normalised) mixing pipeline; outputs per slot as numpy."""
    source.board.publish(0, walk)

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=1,
                  device_id=None, py_num_workers=2, py_start_method="fork")
    def pipe_fn():
        inputs = plan_inputs(source, parallel=parallel)
        return (mix(inputs), inputs.ids, inputs.layout, inputs.weights, inputs.targets,
                inputs.loss_scale)

    pipe = pipe_fn()
    try:
        pipe.build()
        rows = []
        for _ in range(walk.num_slots // batch_size):
            outs = pipe.run()
            for j in range(batch_size):
                rows.append(tuple(np.array(o[j]) for o in outs))
        return rows
    finally:
        close_pipeline(pipe)


def raw_pipeline(source: SlotSource, batch_size: int, parallel: bool):
    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=1,
                  device_id=None, py_num_workers=2, py_start_method="fork",
                  prefetch_queue_depth=2)
    def pipe_fn():
        inputs = plan_inputs(source, parallel=parallel)
        return (mix(inputs), inputs.targets, inputs.weights, inputs.ids, inputs.layout,
                inputs.loss_scale)

    return pipe_fn()


# Every layout, with constituents of assorted sizes.
ALL_LAYOUTS = [
    ([0], [1.0], Layout.SINGLE),
    ([1, 2], [0.5, 0.5], Layout.BLEND),
    ([3, 4, 5], [0.2, 0.3, 0.5], Layout.BLEND),
    ([6, 7], [0.25, 0.75], Layout.HALVES),
    ([8, 9, 10, 11], [0.125, 0.375, 0.125, 0.375], Layout.QUADS),
    ([12, 13], [0.75, 0.25], Layout.HALVES),
]
SIZES = [(40, 48), (32, 32), (37, 53), (50, 30), (28, 41), (64, 64), (33, 47), (45, 45),
         (30, 60), (52, 36), (40, 40), (29, 31), (48, 32), (36, 44)]


# ----------------------------------------------------------------------------- composites
@pytest.mark.parametrize("flip", [False, True])
def test_composite_matches_reference_compose_for_every_layout(flip):
    """DALI's composite equals core.compose_slot on the same decoded JPEGs (fixed view).

    Tolerance, per constituent region: inside (all but the outermost pixel ring) at most 1
    level, from DALI's resampling arithmetic. On the ring DALI extends the image by its edge
    pixels where the reference renormalises the truncated filter; at the 4-7x downscales of
    the narrow regions here that moves edge pixels by up to 26 levels, so the ring is bounded
    by its mean (<= 2.5 per region). Constituents that need no resize are compared exactly in
    the next test.
    """
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    images = InMemoryImages(encoded, [i % 3 for i in range(len(encoded))])
    plan = MixPlan.from_slots([(ids, w, lay) for ids, w, lay in ALL_LAYOUTS], len(encoded),
                              skipped=[])
    source = SlotSource(images, PlanBoard.temporary(), size=(32, 32), stride=8,
                        view=FixedView(flip=flip))
    walk = epoch_walk(plan, batch_size=len(ALL_LAYOUTS), shuffle=False)
    rows = run_raw(source, walk, len(ALL_LAYOUTS))
    assert len(rows) == len(ALL_LAYOUTS)
    for (ids, weights, layout), row in zip(ALL_LAYOUTS, rows):
        image, out_ids, out_layout, out_w, targets = row[:5]
        n = len(ids)
        assert out_ids[:n].tolist() == ids and (out_ids[n:] == -1).all()
        assert int(out_layout) == layout
        np.testing.assert_allclose(out_w[:n], weights, rtol=0, atol=1e-7)
        assert targets[:n].tolist() == [i % 3 for i in ids]
        constituents = [decode(encoded[i]) for i in ids]
        if flip:
            constituents = [c[:, ::-1] for c in constituents]
        ref = compose_slot(constituents, weights, layout, (32, 32), 8)
        assert image.shape == ref.shape == (32, 32, 3)
        diff = np.abs(image.astype(np.int64) - ref.astype(np.int64))
        for i, reg in zip(ids, regions(layout, weights, 32, 32, 8)):
            region = diff[reg.slices]
            assert region[1:-1, 1:-1].max() <= 1, (layout.name, i, region[1:-1, 1:-1].max())
            assert region.mean() <= 2.5, (layout.name, i, region.mean())


def test_constituents_already_region_sized_are_pasted_exactly():
    """Spatial slots whose constituents have their region's size: bit-exact vs reference."""
    # HALVES 0.25/0.75 at 32x32 stride 8 -> 32x8 | 32x24; QUADS 0.125.. -> col 8, row 16.
    plan_slots = [([0, 1], [0.25, 0.75], Layout.HALVES),
                  ([2, 3, 4, 5], [0.125, 0.375, 0.125, 0.375], Layout.QUADS),
                  ([6, 7], [0.4, 0.6], Layout.BLEND)]
    shapes = {}
    for ids, w, lay in plan_slots:
        for i, reg in zip(ids, regions(lay, w, 32, 32, 8)):
            shapes[i] = (reg.height, reg.width)
    encoded = [jpeg(smooth_image(*shapes[i], seed=i)) for i in range(8)]
    plan = MixPlan.from_slots(plan_slots, 8)
    source = SlotSource(InMemoryImages(encoded, [0] * 8), PlanBoard.temporary(), (32, 32), 8,
                        view=FixedView())
    rows = run_raw(source, epoch_walk(plan, 3, shuffle=False), 3)
    for (ids, weights, layout), row in zip(plan_slots, rows):
        ref = compose_slot([decode(encoded[i]) for i in ids], weights, layout, (32, 32), 8)
        np.testing.assert_array_equal(row[0], ref, err_msg=Layout(layout).name)


def test_geometry_comes_from_core_regions_and_random_view_stays_inside_the_image():
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    source = SlotSource(InMemoryImages(encoded, [0] * len(SIZES)), PlanBoard.temporary(),
                        (64, 96), stride=16, view=RandomView())
    plan = MixPlan.from_slots([(ids, w, lay) for ids, w, lay in ALL_LAYOUTS], len(SIZES))
    for row in range(plan.num_slots):
        m = source.slot(plan, row)
        ids, weights, _, layout = plan.slot(row)
        assert m["count"] == len(ids) and m["layout"] == layout
        for i, reg in enumerate(regions(layout, weights.tolist(), 64, 96, 16)):
            (top, left), (ch, cw) = m[f"anchor{i}"], m[f"shape{i}"]
            h, w = SIZES[ids[i]]
            assert tuple(m[f"region{i}"]) == (reg.height, reg.width)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0
            assert m[f"flip{i}"] in (0, 1)
            assert m[f"file{i}"].tobytes() == encoded[ids[i]]
        # absent constituents ship no bytes (so are never decoded) and no id, weight or target
        for i in range(len(ids), source.max_constituents):
            assert m[f"file{i}"].size == 0
        assert (m["ids"][len(ids):] == -1).all() and (m["weights"][len(ids):] == 0).all()
        assert (m["targets"][len(ids):] == -1).all()
    # the same slot, epoch and seed give the same views (reproducible augmentation)
    assert str(source.slot(plan, 4)) == str(source.slot(plan, 4))


def test_views_are_the_slot_seeded_draws_whatever_the_batching():
    """Each constituent's window is the view drawn from default_rng([seed, epoch, *ids]) in
    slot order (the torch loader's rule), whichever batch the slot arrives in; the outputs
    carry the dtypes the graph consumes without casts."""
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    view = RandomView()
    source = SlotSource(InMemoryImages(encoded, [i % 3 for i in range(len(SIZES))]),
                        PlanBoard.temporary(), (48, 64), stride=8, view=view, seed=7)
    plan = MixPlan.from_slots([(ids, w, lay) for ids, w, lay in ALL_LAYOUTS], len(SIZES),
                              epoch=5)
    names = mxd.output_names(source.max_constituents)
    whole = dict(zip(names, source.batch(plan, 0, plan.num_slots)))
    for start, stop in [(0, 2), (2, 5), (5, 6)]:
        part = dict(zip(names, source.batch(plan, start, stop)))
        for name in names:
            if name.startswith("file"):
                assert [a.tobytes() for a in part[name]] == \
                    [a.tobytes() for a in whole[name][start:stop]]
            else:
                np.testing.assert_array_equal(part[name], whole[name][start:stop])
    dtypes = {"targets": np.int64, "weights": np.float32, "ids": np.int64,
              "loss_scale": np.float32, "layout": np.uint8, "count": np.int32,
              "anchor0": np.int32, "shape0": np.int32, "region0": np.float32, "flip0": np.int32}
    assert {name: whole[name].dtype for name in dtypes} == {k: np.dtype(v)
                                                            for k, v in dtypes.items()}
    for row in range(plan.num_slots):
        ids, weights, _, layout = plan.slot(row)
        rng = np.random.default_rng([7, 5, *ids.tolist()])
        for i, reg in enumerate(regions(layout, weights.tolist(), 48, 64, 8)):
            h, w = SIZES[ids[i]]
            want = view(h, w, (reg.height, reg.width), rng)
            got = (*whole[f"anchor{i}"][row], *whole[f"shape{i}"][row], whole[f"flip{i}"][row])
            assert tuple(int(x) for x in got) == (want[0], want[1], want[2], want[3],
                                                  int(want[4]))


def test_image_size_reads_jpeg_headers_like_pillow():
    for (h, w), progressive in [((37, 53), False), ((300, 17), True), ((1, 1), False)]:
        data = jpeg(smooth_image(h, w, 1), progressive=progressive)
        assert image_size(np.frombuffer(data, np.uint8)) == (h, w)
    png = io.BytesIO()
    Image.fromarray(smooth_image(9, 11, 0)).save(png, format="PNG")
    assert image_size(np.frombuffer(png.getvalue(), np.uint8)) == (9, 11)
    with pytest.raises(ValueError, match="SOF"):
        image_size(np.frombuffer(b"\xff\xd8\xff\xe0\x00\x04ab", np.uint8))


# ----------------------------------------------------------------------------- epochs
def pair_plan(n: int, epoch: int, layout: Layout, fraction: float) -> MixPlan:
    rng = np.random.default_rng(100 + epoch)
    perm = rng.permutation(n)
    pairs = int(n * fraction) // 2
    slots = [([int(a), int(b)], [0.25, 0.75] if layout == Layout.HALVES else [0.3, 0.7], layout)
             for a, b in perm[: 2 * pairs].reshape(-1, 2)]
    slots += [([int(i)], [1.0], Layout.SINGLE) for i in perm[2 * pairs:]]
    return MixPlan.from_slots(slots, n, epoch=epoch).validate()


def check_epoch(batches, plan: MixPlan, labels: np.ndarray, batch_size: int) -> None:
    """Every slot of the plan exactly once, padding marked, pixels/targets/ids aligned."""
    got = []
    for b in batches:
        assert b.image.shape[0] == batch_size
        for j in range(batch_size):
            real = b.loss_scale[j] > 0
            ids = b.ids[j].numpy()
            n = int((ids >= 0).sum())
            if not real.any():
                continue
            assert real[:n].all() and not real[n:].any()
            got.append(tuple(ids[:n].tolist()))
            np.testing.assert_array_equal(b.targets[j, :n].numpy(), labels[ids[:n]])
            assert (b.targets[j, n:] == -1).all()
            image = b.image[j].numpy().astype(np.float64)  # HWC uint8 from the raw pipeline
            layout = Layout(int(b.layout[j]))
            w = b.weights[j, :n].numpy().astype(np.float64)
            if layout in (Layout.SINGLE, Layout.BLEND):
                expect = sum(wi * id_colour(i) for wi, i in zip(w, ids[:n]))
                assert np.abs(image[8, 12] - expect).max() <= 4, (ids, image[8, 12], expect)
            else:
                for i, reg in zip(ids[:n], regions(layout, w.tolist(), *image.shape[:2], 8)):
                    centre = image[reg.top + reg.height // 2, reg.left + reg.width // 2]
                    assert np.abs(centre - id_colour(i)).max() <= 4, (ids, i, centre)
    want = sorted(tuple(plan.ids[r][plan.ids[r] >= 0].tolist()) for r in range(plan.num_slots))
    assert sorted(got) == want
    flat = [i for slot in got for i in slot]
    assert sorted(flat) == sorted(set(flat))  # no id twice


@pytest.mark.slow
def test_every_sample_once_per_epoch_with_parallel_workers_and_changing_plans():
    n, batch = 22, 4
    labels = (np.arange(n) * 7) % 10
    images = InMemoryImages(id_images(n), labels)
    plans = [pair_plan(n, 0, Layout.HALVES, 0.5), pair_plan(n, 1, Layout.BLEND, 0.9),
             MixPlan.singles(n, epoch=2, order=np.random.default_rng(3).permutation(n))]
    source = SlotSource(images, PlanBoard.temporary(), (24, 24), stride=8, view=FixedView())
    pipe = raw_pipeline(source, batch, parallel=True)
    with MixIterator(pipe, source, FixedPlans(*plans)) as it:
        for epoch, plan in enumerate(plans):
            it.set_epoch(epoch)
            expected_batches = -(-plan.num_slots // batch)
            assert len(it) == expected_batches
            batches = list(it)
            assert len(batches) == expected_batches
            check_epoch(batches, plan, labels, batch)
            layouts = np.concatenate([b.layout.numpy()[b.loss_scale.numpy()[:, 0] > 0]
                                      for b in batches])
            # the plan change is picked up: this epoch's layouts, not the previous one's
            assert np.bincount(layouts, minlength=4).tolist() == \
                np.bincount(plan.layout, minlength=4).tolist()


def test_epochs_advance_without_set_epoch_and_quads_arrive_whole():
    n, batch = 9, 4
    labels = np.arange(n) % 4
    quads = MixPlan.from_slots([([0, 1, 2, 3], [0.25] * 4, Layout.QUADS),
                                ([4, 5, 6, 7], [0.5, 0.25, 0.125, 0.125], Layout.QUADS),
                                ([8], [1.0], Layout.SINGLE)], n, epoch=0)
    images = InMemoryImages(id_images(n, (32, 32)), labels)
    source = SlotSource(images, PlanBoard.temporary(), (32, 32), stride=8, view=FixedView())
    pipe = raw_pipeline(source, batch, parallel=False)
    with MixIterator(pipe, source, FixedPlans(quads, MixPlan.singles(n))) as it:
        first = list(it)
        check_epoch(first, quads, labels, batch)
        second = list(it)  # epoch 1 without set_epoch: the second plan
        assert it.epoch == 1
        check_epoch(second, MixPlan.singles(n), labels, batch)
    it.close()  # a second close is a no-op
    with pytest.raises(RuntimeError, match="closed"):
        it.set_epoch(2)


class _Down:
    def plan(self, epoch, rank=0, world_size=1):
        raise ConnectionError("selection server unreachable")


@pytest.mark.parametrize("plans", [_Down(), "tcp://127.0.0.1:9"], ids=["raising", "url"])
def test_unreachable_server_gives_single_only_batches_with_one_warning(plans):
    n, batch = 10, 4
    labels = np.arange(n) % 3
    source = SlotSource(InMemoryImages(id_images(n), labels), PlanBoard.temporary(), (24, 24),
                        stride=8, view=FixedView())
    pipe = raw_pipeline(source, batch, parallel=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MixIterator(pipe, source, plans, server_timeout=0.2) as it:
            for epoch in range(2):
                it.set_epoch(epoch)
                batches = list(it)
                check_epoch(batches, MixPlan.singles(n), labels, batch)
                assert all((b.layout == Layout.SINGLE).all() for b in batches)
            # a raising provider is caught here; the network client falls back by itself
            assert it.failures == (2 if isinstance(plans, _Down) else 0)
    fallback = [w for w in caught if "without mixing" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- plans, board
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 9), shuffle=st.booleans(),
       seed=st.integers(0, 5))
def test_epoch_walk_pads_to_whole_batches_and_keeps_every_slot_once(n, batch, shuffle, seed):
    plan = pair_plan(n, seed, Layout.HALVES, 0.6) if n >= 2 else MixPlan.singles(n)
    walk = epoch_walk(plan, batch, shuffle, seed)
    assert walk.num_slots % batch == 0 and walk.num_slots - plan.num_slots < batch
    real = walk.loss_scale[:, 0] > 0
    assert real.sum() == plan.num_slots
    assert not real[plan.num_slots:].any()
    got = sorted(map(tuple, walk.ids[real].tolist()))
    assert got == sorted(map(tuple, plan.ids.tolist()))
    assert walk.equals(epoch_walk(plan, batch, shuffle, seed))


def test_epoch_walk_refuses_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_walk(MixPlan.singles(3), 0)
    empty = MixPlan(np.empty((0, 1), np.int64), np.empty((0, 1)), np.empty((0, 1)),
                    np.empty(0, np.uint8), np.arange(3), 3)
    with pytest.raises(ValueError, match="no slots"):
        epoch_walk(empty, 4)


def test_board_round_trip_pickles_and_times_out_with_a_clear_message(tmp_path):
    board = PlanBoard(str(tmp_path))
    plan = pair_plan(12, 0, Layout.BLEND, 0.5)
    board.publish(3, plan)
    copy = pickle.loads(pickle.dumps(board))
    assert copy.read(3).equals(plan)
    with pytest.raises(PlanNotPublished, match="MixIterator"):
        copy.read(4, timeout=0.05)
    board.publish(5, plan)  # two rounds on, round 3 is gone
    with pytest.raises(PlanNotPublished):
        board.read(3, timeout=0.01)
    with pytest.raises(ValueError, match="timeout"):
        PlanBoard(str(tmp_path), timeout=0)


def test_temporary_board_is_removed_with_its_owner():
    import gc
    import os

    board = PlanBoard.temporary()
    path = board.directory
    assert os.path.isdir(path)
    del board
    gc.collect()
    assert not os.path.exists(path)


def test_source_pickles_and_refuses_plans_it_cannot_deliver(tmp_path):
    images = InMemoryImages(id_images(6), np.zeros(6))
    source = SlotSource(images, PlanBoard(str(tmp_path)), (24, 24), stride=8,
                        max_constituents=2)
    clone = pickle.loads(pickle.dumps(source))
    assert clone.size == (24, 24) and clone.max_constituents == 2
    quads = MixPlan.from_slots([([0, 1, 2, 3], [0.25] * 4, Layout.QUADS), ([4], [1.0], 0),
                                ([5], [1.0], 0)], 6)
    with pytest.raises(ValueError, match="max_constituents=2"):
        source.check_plan(quads)
    with pytest.raises(ValueError, match="7 samples but the source has 6"):
        source.check_plan(MixPlan.singles(7))
    tiny = SlotSource(images, PlanBoard(str(tmp_path)), (8, 24), stride=8)
    with pytest.raises(ValueError, match="QUADS"):
        tiny.check_plan(quads)
    with pytest.raises(ValueError, match="stride"):
        SlotSource(images, PlanBoard(str(tmp_path)), (24, 24), stride=0)


def test_file_list_reads_the_prepared_layout_and_reports_bad_lines(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    data = jpeg(smooth_image(10, 12, 0))
    (tmp_path / "train" / "a" / "000000.jpg").write_bytes(data)
    (tmp_path / "train_files.txt").write_text("train/a/000000.jpg 3\n")
    files = pickle.loads(pickle.dumps(FileList.for_split(str(tmp_path), "train")))
    assert len(files) == 1 and files.label(0) == 3
    assert files.encoded(0).tobytes() == data
    bad = tmp_path / "bad.txt"
    bad.write_text("a/000000.jpg three\n")
    with pytest.raises(ValueError, match="bad.txt:1: label 'three'"):
        FileList(str(bad))
    with pytest.raises(FileNotFoundError, match="mixpipe data prepare"):
        FileList(str(tmp_path / "missing.txt"))
