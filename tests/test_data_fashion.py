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
LIMITS = {"train": 200, "val": 100}
PREFIX = {"train": "train", "val": "t10k"}
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


def reference(split: str):
    n = LIMITS[split]
    gray = idx_array(f"{SRC}/{PREFIX[split]}-images-idx3-ubyte.gz")[:n]
    labels = idx_array(f"{SRC}/{PREFIX[split]}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    rgb = np.zeros((n, 32, 32, 3), np.uint8)
    for c in range(3):
        rgb[:, 2:30, 2:30, c] = gray
    return rgb, labels


def prepare(out, *extra, src=SRC):
    return main(["data", "prepare", "fashion-mnist", "--out", str(out), "--src", str(src),
                 "--limit", str(LIMITS["train"]), "--val-limit", str(LIMITS["val"]),
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


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_form_in_dataset_order(prepared, split):
    rgb, labels = reference(split)
    # File list: line i names sample i, in its class folder, with its label.
    lines = (prepared / f"{split}_files.txt").read_text().splitlines()
    assert lines == [f"{split}/{NAMES[y]}/{i:06d}.jpg {y}" for i, y in enumerate(labels)]
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
    rgb, labels = reference("train")
    arrays, files = ArrayDataset(prepared, "train"), FileListDataset(prepared, "train")
    for ds in (arrays, files):
        assert len(ds) == LIMITS["train"] and ds.num_classes == 10
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int64
    for i in (0, 57, len(labels) - 1):
        image, label = arrays[i]
        np.testing.assert_array_equal(image, rgb[i])
        assert label == labels[i]
        image, label = files[i]
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and label == labels[i]
        close_to(image, rgb[i])
    found = find_prepared(prepared)
    assert found.samples == LIMITS and list(found.classes) == NAMES
    assert set(found.splits["val"]) == {"images", "files", "arrays", "beton"}


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
    assert log.count("skip ") == 9 and "write " not in log


def test_missing_jpeg_is_redone(copy, capsys):
    victim = copy / "train/Ankle_boot/000000.jpg"
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
    path = copy / "val_arrays.npz"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match="cannot be used"):
        ArrayDataset(copy, "val")
    assert "arrays" not in find_prepared(copy).splits["val"]
    assert prepare(copy) == 0
    assert path.stat().st_size == size
    np.testing.assert_array_equal(ArrayDataset(copy, "val").images, reference("val")[0])


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
    assert len(FileListDataset(copy, "val")) == LIMITS["val"]


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
    np.testing.assert_array_equal(ArrayDataset(copy, "train").labels, reference("train")[1])


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
    np.testing.assert_array_equal(ArrayDataset(copy, "train").images, reference("train")[0])
