"""``mixpipe data prepare fashion-mnist`` on a subset of the real Debian-packaged files.

References are computed here from the IDX files with a few lines of numpy + gzip, independent of
mixpipe's reader; the .beton is read back with FFCV's own Reader and decoded with pillow.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mixpipe.cli import main
from mixpipe.data import ArrayDataset, DataError, FileListDataset, find_prepared

SRC = "/usr/share/datasets/fashion-mnist"
NAMES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle_boot"]
#: source images read (the prepared train and val splits share the first 200 training images)
LIMITS = {"train": 200, "test": 100}
PREFIX = {"train": "train", "test": "t10k"}
SOURCE = {"train": "train", "val": "train", "test": "test"}
HELD = 21  # 10 % of each class's count among the first 200 (rounded), see the hold-out test
# JPEG at quality 95 of these images: pillow's round trip stays within 10 grey levels, FFCV's
# OpenCV encoder within ~26 at the sharpest edges; the mean error is about 1.5.
MAX_ERR, MEAN_ERR = 40, 3.0

pytestmark = pytest.mark.skipif(not os.path.isdir(SRC),
                                reason="needs `apt-get install dataset-fashion-mnist`")


def idx_array(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def source(split: str):
    """The padded RGB images and labels of an IDX source, computed here from the files."""
    n = LIMITS[split]
    gray = idx_array(f"{SRC}/{PREFIX[split]}-images-idx3-ubyte.gz")[:n]
    labels = idx_array(f"{SRC}/{PREFIX[split]}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    rgb = np.zeros((n, 32, 32, 3), np.uint8)
    for c in range(3):
        rgb[:, 2:30, 2:30, c] = gray
    return rgb, labels


def rows_of(prepared, split: str) -> np.ndarray:
    """The source rows a prepared split holds, read from its file names (``<row:06d>.jpg``)."""
    lines = (prepared / f"{split}_files.txt").read_text().splitlines()
    return np.asarray([int(line.split(" ")[0].rsplit("/", 1)[1][:6]) for line in lines])


def reference(split: str, prepared=None):
    rgb, labels = source(SOURCE[split])
    if split == "test":
        return rgb, labels
    rows = rows_of(prepared, split)
    return rgb[rows], labels[rows]


def prepare(out, *extra, src=SRC):
    return main(["data", "prepare", "fashion-mnist", "--out", str(out), "--src", str(src),
                 "--limit", str(LIMITS["train"]), "--test-limit", str(LIMITS["test"]),
                 "--workers", "1", *extra])


def mtimes(root):
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return found


def read_beton(path: str):
    """(images decoded with pillow, labels) in the beton's record order, via ffcv.reader."""
    from ffcv.reader import Reader

    reader = Reader(path)
    assert reader.field_names == ["image", "label"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    images = []
    with open(path, "rb") as f:
        for meta in reader.metadata["f0"]:
            assert meta["mode"] == 0  # 0 = JPEG in ffcv's IMAGE_MODES
            f.seek(int(meta["data_ptr"]))
            data = f.read(sizes[int(meta["data_ptr"])])
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return np.stack(images), np.asarray(reader.metadata["f1"], np.int64)


def close_to(decoded: np.ndarray, exact: np.ndarray) -> None:
    diff = np.abs(decoded.astype(int) - exact.astype(int))
    assert diff.max() <= MAX_ERR and diff.mean() <= MEAN_ERR, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "out"
    assert prepare(out) == 0
    return out


def test_holdout_is_a_stratified_disjoint_part_of_the_training_images(prepared):
    train, val = rows_of(prepared, "train"), rows_of(prepared, "val")
    assert len(val) == HELD and len(train) == LIMITS["train"] - HELD
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(LIMITS["train"]))
    labels = source("train")[1]
    # every class keeps its share on both sides: 10 % of its images, rounded, at least one
    counts = np.bincount(labels, minlength=10)
    expected = [min(max(round(0.1 * c), 1), c - 1) for c in counts]
    assert np.bincount(labels[val], minlength=10).tolist() == expected
    assert sum(expected) == HELD
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # dataset order kept


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_form_in_dataset_order(prepared, split):
    rgb, labels = reference(split, prepared)
    # File list: line i names sample i, in its class folder, with its label.
    lines = (prepared / f"{split}_files.txt").read_text().splitlines()
    rows = rows_of(prepared, split) if split != "test" else range(len(labels))
    assert lines == [f"{split}/{NAMES[y]}/{i:06d}.jpg {y}" for i, y in zip(rows, labels)]
    # Arrays: the exact padded pixels (before JPEG).
    with np.load(prepared / f"{split}_arrays.npz") as z:
        assert z["images"].dtype == np.uint8 and z["labels"].dtype == np.int64
        np.testing.assert_array_equal(z["images"], rgb)
        np.testing.assert_array_equal(z["labels"], labels)
    # JPEG tree: RGB 32x32, close to the originals.
    decoded = []
    for line in lines:
        with Image.open(prepared / line.split(" ")[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
            decoded.append(np.asarray(im))
    close_to(np.stack(decoded), rgb)
    # .beton: same order, same labels, images close to the originals.
    images, beton_labels = read_beton(str(prepared / f"{split}.beton"))
    np.testing.assert_array_equal(beton_labels, labels)
    close_to(images, rgb)
    assert (prepared / "classes.txt").read_text().splitlines() == NAMES


def test_datasets(prepared):
    rgb, labels = reference("train", prepared)
    arrays, files = ArrayDataset(prepared, "train"), FileListDataset(prepared, "train")
    for ds in (arrays, files):
        assert len(ds) == LIMITS["train"] - HELD and ds.num_classes == 10
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int64
    for i in (0, 57, len(labels) - 1):
        image, label = arrays[i]
        np.testing.assert_array_equal(image, rgb[i])
        assert label == labels[i]
        image, label = files[i]
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and label == labels[i]
        close_to(image, rgb[i])
    found = find_prepared(prepared, ("train", "val", "test"))
    assert found.samples == {"train": LIMITS["train"] - HELD, "val": HELD, "test": LIMITS["test"]}
    assert list(found.classes) == NAMES
    for split in ("train", "val", "test"):
        assert set(found.splits[split]) == {"images", "files", "arrays", "beton"}


@pytest.fixture
def copy(prepared, tmp_path):
    """A private copy of the prepared output (copy2 keeps mtimes) to damage."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out, symlinks=True, copy_function=shutil.copy2)
    return out


def test_rerun_skips_everything(copy, capsys):
    before = mtimes(copy)
    assert prepare(copy) == 0
    assert mtimes(copy) == before
    log = capsys.readouterr().out
    assert log.count("skip ") == 13 and "write " not in log


def test_missing_jpeg_is_redone(copy, capsys):
    victim = copy / ("train/" + (copy / "train_files.txt").read_text().split(" ")[0]
                     .split("/", 1)[1])
    content = victim.read_bytes()
    victim.unlink()
    with pytest.raises(DataError, match="content changed"):
        FileListDataset(copy, "train")
    before = mtimes(copy)
    assert prepare(copy) == 0
    assert victim.read_bytes() == content  # same encoder, same bytes
    after = mtimes(copy)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("train/") or k == ".manifest-train.images.json"
                           for k in changed), changed
    FileListDataset(copy, "train")


def test_truncated_npz_is_redone(copy):
    path = copy / "test_arrays.npz"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match="cannot be used"):
        ArrayDataset(copy, "test")
    assert "arrays" not in find_prepared(copy, ("test",)).splits["test"]
    assert prepare(copy) == 0
    assert path.stat().st_size == size
    np.testing.assert_array_equal(ArrayDataset(copy, "test").images, reference("test")[0])


def test_leftover_temp_dir_is_redone(copy):
    leftover = copy / ".tmp-val.files-abc123"
    leftover.mkdir()
    (leftover / "val_files.txt").write_text("half a line")
    with pytest.raises(DataError, match="interrupted"):
        FileListDataset(copy, "val")
    before = mtimes(copy)
    assert prepare(copy) == 0
    assert not leftover.exists()
    after = mtimes(copy)
    assert after["val_files.txt"] != before["val_files.txt"]
    assert after["val_arrays.npz"] == before["val_arrays.npz"]
    assert len(FileListDataset(copy, "val")) == HELD


def test_failed_build_leaves_no_usable_artifact(copy, monkeypatch):
    import mixpipe.data.prepare as prep

    def broken(path, images, labels):
        with open(path, "wb") as f:
            f.write(b"PK half")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    (copy / "train_arrays.npz").unlink()
    monkeypatch.setattr(prep, "write_arrays", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare(copy)
    assert not (copy / "train_arrays.npz").exists()
    assert not [p for p in os.listdir(copy) if p.startswith(".tmp-")]
    with pytest.raises(DataError):
        ArrayDataset(copy, "train")
    monkeypatch.undo()
    assert prepare(copy) == 0
    np.testing.assert_array_equal(ArrayDataset(copy, "train").labels,
                                  reference("train", copy)[1])


def test_new_quality_redoes_only_the_jpegs(copy, capsys):
    before = mtimes(copy)
    assert prepare(copy, "--quality", "80", "--no-beton") == 0
    after = mtimes(copy)
    log = capsys.readouterr().out
    assert "write train: the source or the settings changed" in log
    assert after["train_arrays.npz"] == before["train_arrays.npz"]
    assert after["train_files.txt"] == before["train_files.txt"]
    # The .beton was made at quality 95 and not asked for now: stale, so removed.
    assert not (copy / "train.beton").exists() and "beton" not in find_prepared(copy).splits["train"]


def test_missing_source_dir(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(out, src=tmp_path / "nowhere") == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not out.exists()


def test_truncated_idx_file(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(SRC):
        os.symlink(os.path.join(SRC, name), src / name)
    bad = src / "t10k-images-idx3-ubyte.gz"
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[: len(data) // 3])
    assert prepare(tmp_path / "out", "--no-beton", src=src) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz" in err and "truncated" in err


def test_foreign_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert prepare(out) == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["thesis.tex"]


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--quality", "101"),
                                        ("--workers", "0")])
def test_bad_settings(tmp_path, capsys, flag, value):
    assert main(["data", "prepare", "fashion-mnist", "--out", str(tmp_path / "o"), flag,
                 value]) == 2
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err


def test_verify_catches_same_size_damage(copy, capsys, monkeypatch):
    import mixpipe.data.artifacts as artifacts

    # Files under 1 MiB are hashed on every run; make this small npz count as large.
    monkeypatch.setattr(artifacts, "_ALWAYS_HASH", 0)
    path = copy / "train_arrays.npz"
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # a pixel byte near the end of the image array; sizes unchanged
    path.write_bytes(bytes(data))
    assert prepare(copy) == 0  # sizes and headers only: not noticed
    assert "write train_arrays.npz" not in capsys.readouterr().out
    assert prepare(copy, "--verify") == 0
    assert "write train_arrays.npz: its content changed" in capsys.readouterr().out
    np.testing.assert_array_equal(ArrayDataset(copy, "train").images,
                                  reference("train", copy)[0])
