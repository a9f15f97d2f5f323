"""``mixpipe data prepare cifar10`` on a tiny CIFAR-10 made here in torchvision's exact format.

The reference is the HWC images the batches were made from, so the check does not share the
reader's plane-to-pixel transpose; the .beton is counted with FFCV's own Reader.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from mixpipe.cli import main
from mixpipe.data import ArrayDataset, DataError, FileListDataset, find_prepared
from mixpipe.data.cifar10 import prepare_cifar10
from mixpipe.data.holdout import DEFAULT_FRACTION

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]
TRAIN_BATCHES, PER_BATCH, TEST_IMAGES = 5, 12, 20


def images_and_labels(rng, n):
    """Blocky images (16x16 blocks, JPEG's unit with chroma subsampling, so JPEG stays close:
    a mean error of about 2 to 4 levels at quality 95, where another image would differ by
    about 85) and labels covering every class about equally."""
    coarse = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)
    labels = rng.permutation(np.arange(n) % len(NAMES))
    return images, labels


def planes(images):
    """HWC images -> CIFAR rows: the 1024 R values, then G, then B, each row-major."""
    return np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_batches(folder, seed=0):
    """torchvision's cifar-10-batches-py layout; returns {split: (HWC images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    train_images, train_labels = images_and_labels(rng, TRAIN_BATCHES * PER_BATCH)
    test_images, test_labels = images_and_labels(rng, TEST_IMAGES)
    batches = {f"data_batch_{b + 1}": slice(b * PER_BATCH, (b + 1) * PER_BATCH)
               for b in range(TRAIN_BATCHES)}
    for name, rows in batches.items():
        dump(folder / name, {b"batch_label": f"training batch {name[-1]} of 5".encode(),
                             b"labels": [int(y) for y in train_labels[rows]],
                             b"data": planes(train_images[rows]),
                             b"filenames": [f"img_{i}.png".encode() for i in
                                            range(rows.start, rows.stop)]})
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                 b"labels": [int(y) for y in test_labels],
                                 b"data": planes(test_images),
                                 b"filenames": [b"t.png"] * TEST_IMAGES})
    dump(folder / "batches.meta", {b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072,
                                   b"label_names": [n.encode() for n in NAMES]})
    return {"train": (train_images, train_labels), "test": (test_images, test_labels)}


def rows_of(out, split):
    """The source rows a prepared split holds, from its file names ``<class>/<row:06d>.jpg``."""
    lines = (out / f"{split}_files.txt").read_text().splitlines()
    return np.asarray([int(line.split(" ")[0].rsplit("/", 1)[1][:6]) for line in lines])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    source = make_batches(root / "cifar-10-batches-py")
    out = root / "out"
    # --src is torchvision's root, the folder above cifar-10-batches-py
    assert main(["data", "prepare", "cifar10", "--src", str(root), "--out", str(out),
                 "--workers", "1"]) == 0
    return source, out


def test_arrays_and_labels_are_the_pickled_pixels(made):
    source, out = made
    assert (out / "classes.txt").read_text().splitlines() == NAMES
    for split, source_split in (("train", "train"), ("val", "train"), ("test", "test")):
        images, labels = source[source_split]
        rows = rows_of(out, split) if split != "test" else np.arange(len(labels))
        ds = ArrayDataset(out, split)
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(ds.images, images[rows])
        np.testing.assert_array_equal(ds.labels, labels[rows])
        files = FileListDataset(out, split)  # the JPEG tree says the same, up to JPEG's loss
        np.testing.assert_array_equal(files.labels, labels[rows])
        for i in range(len(files)):
            assert files.relpaths[i].split("/")[1] == NAMES[labels[rows][i]]
            err = np.abs(files[i][0].astype(int) - images[rows][i].astype(int))
            assert err.mean() < 8.0


def test_holdout_is_stratified_and_the_splits_add_up(made):
    source, out = made
    train, val = rows_of(out, "train"), rows_of(out, "val")
    labels = source["train"][1]
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(len(labels)))
    for cls in range(len(NAMES)):
        n = int((labels == cls).sum())
        want = min(max(round(DEFAULT_FRACTION * n), 1), n - 1)
        assert int((labels[val] == cls).sum()) == want
    assert len(ArrayDataset(out, "test")) == len(source["test"][1])


def test_beton_has_every_sample(made):
    pytest.importorskip("ffcv")
    from ffcv.reader import Reader

    source, out = made
    prepared = find_prepared(out, ("train", "val", "test"))
    for split in ("train", "val", "test"):
        reader = Reader(prepared.path(split, "beton"))
        assert reader.num_samples == prepared.samples[split] == len(rows_of(out, split))
        np.testing.assert_array_equal(np.asarray(reader.metadata["f1"], np.int64),
                                      ArrayDataset(out, split).labels)


def test_speedup_benchmark_loads_it(made):
    from mixpipe.bench.speedup.data import load_data
    from mixpipe.bench.speedup.settings import SpeedupSettings

    source, out = made
    for loader in ("torch", "ffcv"):
        s = SpeedupSettings(data=str(out), loader=loader, image_size=32, batch_size=8,
                            workers=0, progress=False)
        train, val, classes = load_data(s, log=lambda *a, **k: None)
        assert classes == len(NAMES)
        assert len(train) + len(val) == len(source["train"][1])
        image, label = val[0]
        assert image.shape == (32, 32, 3) and label == source["train"][1][rows_of(out, "val")[0]]


def test_rerun_skips_everything(made):
    _, out = made
    logged = []
    prepare_cifar10(out.parent, out, workers=1, log=logged.append)
    assert logged and all(line.startswith("skip") for line in logged)


def run_cli(src, out, capsys, *extra):
    code = main(["data", "prepare", "cifar10", "--src", str(src), "--out", str(out),
                 "--workers", "1", "--no-beton", *extra])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("damage", ["truncated", "missing", "shape", "labels", "not a dict"])
def test_bad_batches_are_one_line_errors(tmp_path, capsys, damage):
    folder = tmp_path / "cifar-10-batches-py"
    make_batches(folder)
    batch = folder / "data_batch_3"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:2000])
    elif damage == "missing":
        batch.unlink()
    elif damage == "shape":
        dump(batch, {b"labels": [0] * 4, b"data": np.zeros((4, 3000), np.uint8)})
    elif damage == "labels":
        dump(batch, {b"labels": [len(NAMES)] * 4, b"data": np.zeros((4, 3072), np.uint8)})
    else:
        dump(batch, [1, 2, 3])
    code, err = run_cli(folder, tmp_path / "out", capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "data_batch_3" in err and "extract cifar-10-python.tar.gz again" in err
    assert {"truncated": "truncated", "missing": "missing", "shape": "uint8 [N, 3072]",
            "labels": "labels outside", "not a dict": "not a CIFAR-10 batch"}[damage] in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


class _Runs:
    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    make_batches(folder)
    evil = _Runs()
    evil.path = str(tmp_path / "ran")
    dump(folder / "batches.meta", {b"label_names": evil}, protocol=pickle.HIGHEST_PROTOCOL)
    code, err = run_cli(folder, tmp_path / "out", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "batches.meta" in err
    assert "posix.mkdir" in err or "os.mkdir" in err
    assert not (tmp_path / "ran").exists()


def test_newer_pickle_protocols_read_the_same(tmp_path):
    from mixpipe.data.cifar10 import load_split

    folder = tmp_path / "cifar-10-batches-py"
    source = make_batches(folder)
    for name in ("data_batch_1", "test_batch"):  # rewritten by Python 3 with str keys
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        dump(folder / name, {k.decode(): v for k, v in batch.items()},
             protocol=pickle.HIGHEST_PROTOCOL)
    for split in ("train", "test"):
        images, labels = load_split(str(folder), split, len(NAMES))
        np.testing.assert_array_equal(images, source[split][0])
        np.testing.assert_array_equal(labels, source[split][1])


def test_a_class_folder_tree_with_test(tmp_path):
    """A Kaggle-style tree: SRC/{train,test}/<class>/<image>; lossless PNGs, so the arrays are
    the pixels exactly."""
    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", 20), ("test", 10)):
        images, labels = images_and_labels(rng, n)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "src" / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            written[f"{split}/{NAMES[label]}/{i:03d}.png"] = (image, label)
    out = tmp_path / "out"
    paths = prepare_cifar10(tmp_path / "src", out, beton=False, workers=1, log=lambda _: None)
    assert {"train_arrays", "val_arrays", "test_arrays", "test_files"} <= set(paths)
    total = 0
    for split in ("train", "val", "test"):
        files, arrays = FileListDataset(out, split), ArrayDataset(out, split)
        for i in range(len(files)):
            real = os.path.relpath(os.path.realpath(files.path(i)), tmp_path / "src")
            image, label = written[real]
            np.testing.assert_array_equal(arrays.images[i], image)
            assert arrays.labels[i] == label == files.labels[i]
        total += len(files)
    assert total == len(written)


def test_neither_batches_nor_tree(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="neither a cifar-10-batches-py folder"):
        prepare_cifar10(tmp_path / "src", tmp_path / "out", log=lambda _: None)
