"""The DALI arm of ``mixpipe bench speedup``: coverage, targets, the value scale Normalize
expects, augmentation, ``--limit``, errors, worker shutdown, and one end-to-end run."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
from PIL import Image  # noqa: E402

from mixpipe.bench.speedup import SpeedupSettings, run_benchmark  # noqa: E402
from mixpipe.core.compose import compose_slot  # noqa: E402
from mixpipe.core.layouts import regions  # noqa: E402
from mixpipe.core.plan import Layout  # noqa: E402
from mixpipe.bench.speedup.dali_arm import speedup_loader  # noqa: E402
from mixpipe.dali import FileList  # noqa: E402
from mixpipe.bench.speedup.dali_arm import FirstImages, device_id_of, warm_files  # noqa: E402
from mixpipe.data.subset import FirstN as _Subset  # noqa: E402
from mixpipe.data import ArrayDataset, prepare_tree  # noqa: E402
from mixpipe.server import InProcessService  # noqa: E402
from mixpipe.train import Normalize  # noqa: E402

N_TRAIN, N_VAL, BATCH = 37, 9, 8  # 37 is not a multiple of the batch: the walk is padded
CLASSES = ["cat", "ant", "dog"]  # not sorted: labels come from the sorted names


def picture(i: int) -> np.ndarray:
    """A distinct, smooth-ish 32x32 picture per sample (not mirror-symmetric)."""
    y, x = np.mgrid[0:32, 0:32]
    rng = np.random.default_rng(i)
    a, b = rng.uniform(1.0, 4.0, 2)
    img = np.stack([127 + 110 * np.sin(x / 32 * a * 3 + i), 127 + 110 * np.cos(y / 32 * b * 3),
                    (x * 6 + y * 2 + 17 * i) % 256], axis=-1)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared tree (file lists + arrays) of JPEGs; the arrays are pillow's decode of them."""
    root = tmp_path_factory.mktemp("dali-speedup")
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for i in range(n):
            folder = root / "src" / split / CLASSES[i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            # 4:4:4 so pillow (the arrays) and DALI decode to the same pixels
            Image.fromarray(picture(i + 1000 * (split == "val"))).save(
                folder / f"{i:03d}.jpg", quality=95, subsampling=0)
    out = root / "out"
    prepare_tree(str(root / "src"), str(out), arrays=True, workers=1, holdout=0.0,
                 log=lambda *a, **k: None)
    return str(out)


def settings(data: str, **kw) -> SpeedupSettings:
    base = dict(data=data, loader="dali", batch_size=BATCH, epochs=2, policies=("none",),
                seeds=(0,), workers=0, threads=1, augment="none", layout="halves",
                progress=False, eval_split="test")
    base.update(kw)
    base.setdefault("warmup_epochs", min(1, base["epochs"] - 1))
    return SpeedupSettings(**base)


def run_epochs(loader, epochs, service=None):
    """Every epoch's (plan, batches); batches as numpy dicts, len() taken before iterating. The
    loader is closed afterwards, as the benchmark closes it after an arm's last epoch."""
    out = []
    try:
        for epoch in range(epochs):
            plan = loader.set_epoch(epoch)
            steps = len(loader)
            batches = [{k: getattr(b, k).numpy().copy() for k in b._fields} for b in loader]
            out.append((plan, steps, batches))
            if service is not None:
                service.commit(epoch)
    finally:
        loader.close()
    return out


def stacked(batches, field):
    return np.concatenate([b[field] for b in batches])


def real_ids(batches):
    ids, scale = stacked(batches, "ids"), stacked(batches, "loss_scale")
    return ids[(ids >= 0) & (scale > 0)]


# ----------------------------------------------------------------------------- unmixed
def test_unmixed_epochs_cover_every_sample_on_the_torch_scale(prepared):
    train = _Subset(ArrayDataset(prepared, "train"), None)
    s = settings(prepared)
    loader = speedup_loader(s, train, None, seed=0)
    epochs = run_epochs(loader, 2)
    assert loader.closed
    for plan, steps, batches in epochs:
        assert plan.num_slots == N_TRAIN  # the plan, not the padded walk
        assert steps == len(batches) == -(-N_TRAIN // BATCH)
        assert sorted(real_ids(batches).tolist()) == list(range(N_TRAIN))
        ids, image = stacked(batches, "ids")[:, 0], stacked(batches, "image")
        real = stacked(batches, "loss_scale")[:, 0] > 0
        assert (stacked(batches, "targets")[:, 0] == train.labels[ids]).all()
        assert (stacked(batches, "layout") == Layout.SINGLE).all()
        assert image.shape == (len(ids), 3, 32, 32) and image.dtype == np.float32
        # what the torch arm feeds fit for the same samples: the uint8 arrays, CHW
        arrays = np.moveaxis(train.base.images[ids], 3, 1)
        assert np.abs(image * 255.0 - arrays).max() < 1e-3
        ours = Normalize()(torch.from_numpy(image))
        torch_arm = Normalize()(torch.from_numpy(arrays))
        assert torch.allclose(ours, torch_arm, rtol=0, atol=1e-5)
        assert real.sum() == N_TRAIN and (~real).sum() == len(ids) - N_TRAIN
    # the two epochs walk the samples in different orders (a shuffled walk per epoch)
    assert not np.array_equal(stacked(epochs[0][2], "ids"), stacked(epochs[1][2], "ids"))


def test_limit_trains_on_the_first_samples(prepared):
    train = _Subset(ArrayDataset(prepared, "train"), 20)
    loader = speedup_loader(settings(prepared, limit=20, epochs=1), train, None, seed=3)
    [(plan, steps, batches)] = run_epochs(loader, 1)
    assert plan.num_samples == 20 and steps == len(batches) == 3
    assert sorted(real_ids(batches).tolist()) == list(range(20))
    ids = stacked(batches, "ids")[:, 0]
    arrays = np.moveaxis(train.base.images[ids], 3, 1)
    assert np.abs(stacked(batches, "image") * 255.0 - arrays).max() < 1e-3


def test_flip_mirrors_whole_images_at_random(prepared):
    train = _Subset(ArrayDataset(prepared, "train"), None)
    loader = speedup_loader(settings(prepared, augment="flip", epochs=1), train, None, seed=0)
    [(_, _, batches)] = run_epochs(loader, 1)
    ids = stacked(batches, "ids")[:, 0]
    image = np.rint(stacked(batches, "image") * 255.0)
    arrays = np.moveaxis(train.base.images[ids], 3, 1).astype(np.float64)
    same = (np.abs(image - arrays).max(axis=(1, 2, 3)) == 0)
    mirrored = (np.abs(image - arrays[..., ::-1]).max(axis=(1, 2, 3)) == 0)
    assert (same ^ mirrored).all()  # each is the whole image, either way round
    assert same.any() and mirrored.any()  # both happen (p of failing: 2 * 2**-37)


def test_crop_gives_region_sized_uint8_scale_composites(prepared):
    train = _Subset(ArrayDataset(prepared, "train"), None)
    loader = speedup_loader(settings(prepared, augment="crop", epochs=1), train, None, seed=0)
    [(_, _, batches)] = run_epochs(loader, 1)
    image = stacked(batches, "image")
    assert image.shape[1:] == (3, 32, 32)
    assert np.abs(image * 255.0 - np.rint(image * 255.0)).max() < 1e-3
    ids = stacked(batches, "ids")[:, 0]
    arrays = np.moveaxis(train.base.images[ids], 3, 1)
    assert np.abs(np.rint(image * 255.0) - arrays).max() > 0  # not the identity view


# ----------------------------------------------------------------------------- mixed
@pytest.mark.slow
def test_mixed_plans_cover_every_sample_once_with_parallel_source(prepared):
    train = _Subset(ArrayDataset(prepared, "train"), None)
    service = InProcessService(N_TRAIN, {"policy": "random", "fraction": 0.6, "layout": "halves",
                                         "grid_cells": 4}, seed=0)
    s = settings(prepared, workers=1)  # a spawned source worker
    loader = speedup_loader(s, train, service, seed=0)
    workers = multiprocessing.active_children()
    assert workers  # started by speedup_loader, before the first epoch
    epochs = run_epochs(loader, 2, service)
    assert loader.closed and not any(p.is_alive() for p in workers)
    arrays = train.base.images
    halves = 0
    for plan, steps, batches in epochs:
        assert steps == len(batches) == -(-plan.num_slots // BATCH)
        assert plan.num_slots < N_TRAIN
        assert sorted(real_ids(batches).tolist()) == list(range(N_TRAIN))
        ids, targets = stacked(batches, "ids"), stacked(batches, "targets")
        assert (targets[ids >= 0] == train.labels[ids[ids >= 0]]).all()
        rows = {tuple(r[r >= 0]): w for r, w in zip(plan.ids, plan.weights)}
        for b in batches:
            for image, row, w, lay, scale in zip(b["image"], b["ids"], b["weights"], b["layout"],
                                                 b["loss_scale"]):
                key = tuple(row[row >= 0])
                np.testing.assert_allclose(w[:len(key)], rows[key][:len(key)], atol=1e-7)
                # uint8 composites / 255: the scale Normalize takes floats on
                assert np.abs(image * 255.0 - np.rint(image * 255.0)).max() < 1e-3
                if lay != Layout.HALVES or scale[0] == 0:
                    continue
                halves += 1
                ref = compose_slot([arrays[i] for i in key], w[:2], Layout.HALVES, (32, 32), 8)
                diff = np.abs(np.rint(np.moveaxis(image, 0, 2) * 255.0) - ref)
                for reg in regions(Layout.HALVES, w[:2], 32, 32, 8):
                    region = diff[reg.slices]  # DALI resampling: see test_dali's tolerance
                    assert region[1:-1, 1:-1].max() <= 1 and region.mean() <= 2.5
    assert halves > 0


# ----------------------------------------------------------------------------- errors
class _Sized:
    """A dataset stand-in: a length and optionally labels."""

    def __init__(self, n, labels=None):
        self.n, self.labels = n, labels

    def __len__(self):
        return self.n


def test_missing_file_list_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_files.txt.*mixpipe data prepare"):
        speedup_loader(settings(str(tmp_path)), _Sized(4), None, seed=0)


def test_more_samples_than_listed_is_refused(prepared):
    with pytest.raises(ValueError, match=f"{N_TRAIN + 1} samples.*lists only {N_TRAIN}"):
        speedup_loader(settings(prepared), _Sized(N_TRAIN + 1), None, seed=0)


def test_file_list_out_of_dataset_order_is_refused(prepared):
    labels = ArrayDataset(prepared, "train").labels.copy()
    labels[[0, -1]] = labels[[-1, 0]]  # classes are in sorted order: first and last differ
    assert labels[0] != labels[-1]
    with pytest.raises(ValueError, match="disagree on the label of 2 .*first: id 0"):
        speedup_loader(settings(prepared), _Sized(N_TRAIN, labels), None, seed=0)


def test_device_ids():
    assert device_id_of("cpu") is None
    assert device_id_of("cuda") == 0 and device_id_of("cuda:3") == 3
    for bad in ("mps", "cuda:x", "cpu:1"):
        with pytest.raises(ValueError, match="'cpu' or 'cuda"):
            device_id_of(bad)


def test_warm_files_reads_the_subset_or_nothing(prepared):
    images = FirstImages(FileList.for_split(prepared, "train"), 5)
    sizes = [os.path.getsize(images.path(i)) for i in range(5)]
    assert warm_files(images) == sum(sizes)
    assert warm_files(images, limit_bytes=sum(sizes) - 1) == 0  # too big to keep cached: skip
    with pytest.raises(IndexError):
        images.encoded(5)


# ----------------------------------------------------------------------------- shutdown
@pytest.mark.slow
def test_unfinished_run_exits_without_hanging(prepared):
    """A loader dropped mid-run (no close) must not keep the interpreter from exiting."""
    script = textwrap.dedent(f"""
        from mixpipe.bench.speedup import SpeedupSettings
        from mixpipe.data.subset import FirstN as _Subset
        from mixpipe.data import ArrayDataset
        from mixpipe.bench.speedup.dali_arm import speedup_loader

        if __name__ == "__main__":
            s = SpeedupSettings(data={prepared!r}, loader="dali", batch_size=8, epochs=3,
                                workers=1, augment="none", progress=False)
            loader = speedup_loader(s, _Subset(ArrayDataset({prepared!r}, "train"), None),
                                    None, 0)
            loader.set_epoch(0)
            print(sum(1 for _ in loader), flush=True)  # one of three epochs, then exit
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(-(-N_TRAIN // 8))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_benchmark_runs_the_dali_arm(prepared):
    threads = torch.get_num_threads()  # run_benchmark sets torch's thread count
    try:
        payload = run_benchmark(settings(prepared, epochs=2, policies=("none", "mixtrain"),
                                         layout="quads", model="resnet-tiny", workers=1,
                                         batch_size=16, eval_limit=None),
                                out=None, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    summary = payload["summary"]
    none, mix = summary["none"], summary["mixtrain"]
    assert none["forward_inputs_per_epoch"] == [N_TRAIN, N_TRAIN]
    assert mix["forward_inputs_per_epoch"][0] == N_TRAIN  # warm-up epoch: no mixing
    assert mix["forward_inputs_per_epoch"][1] < N_TRAIN
    assert mix["speedup_bound"] > 1.0
    assert not multiprocessing.active_children()  # every arm closed its workers
