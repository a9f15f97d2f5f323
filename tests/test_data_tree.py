"""``mixpipe data prepare tree`` on a class-folder tree made here, read back by pillow, DALI's
file reader and FFCV's Reader."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from mixpipe.cli import main
from mixpipe.data import DataError, FileListDataset, ArrayDataset, find_prepared, prepare_tree

# class -> [(file name, pillow mode, (w, h), format)]; names deliberately not in sorted order.
TRAIN = {
    "dog": [("b.png", "RGBA", (20, 12), "PNG"), ("a.png", "RGB", (16, 24), "PNG")],
    "ant": [("z.jpg", "RGB", (30, 20), "JPEG"), ("m.png", "L", (12, 12), "PNG"),
            ("c 1.png", "RGB", (40, 8), "PNG")],
    "cat": [("x.bmp", "RGB", (9, 7), "BMP")],
}
VAL = {"dog": [("v.png", "RGB", (10, 10), "PNG")], "ant": [("w.png", "RGB", (10, 10), "PNG")]}
CLASSES = ["ant", "cat", "dog"]


def make_tree(root, splits, seed=0):
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for cls, files in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name, mode, (w, h), fmt in files:
                channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
                pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                    folder / name, format=fmt)
            (folder / "notes.txt").write_text("not an image")
    return root


def expected(root, split):
    """(relative paths, labels) by the documented rule: classes sorted, files sorted."""
    rows = []
    for label, cls in enumerate(CLASSES):
        folder = root / split / cls
        if folder.is_dir():
            rows += [(f"{split}/{cls}/{n}", label) for n in sorted(os.listdir(folder))
                     if not n.endswith(".txt")]
    return [r for r, _ in rows], [y for _, y in rows]


@pytest.fixture
def src(tmp_path):
    return make_tree(tmp_path / "src", {"train": TRAIN, "val": VAL})


def run_tree(src, out, *extra):
    """Prepare without a hold-out, so the train split is SRC/train itself (the hold-out has its
    own test)."""
    return main(["data", "prepare", "tree", "--src", str(src), "--out", str(out), "--workers",
                 "1", "--holdout", "0", *extra])


#: prepared split -> the source folder it comes from (SRC/val is the test split)
SOURCE_OF = {"train": "train", "test": "val"}


def test_file_lists_and_decoding(src, tmp_path):
    out = tmp_path / "out"
    assert run_tree(src, out) == 0
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    for split, source in SOURCE_OF.items():
        rel, labels = expected(src, source)
        lines = (out / f"{split}_files.txt").read_text().splitlines()
        assert lines == [f"{split}/{r.split('/', 1)[1]} {y}" for r, y in zip(rel, labels)]
        assert os.path.realpath(out / split) == os.path.realpath(src / source)
        ds = FileListDataset(out, split)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.num_classes == 3
        for i, r in enumerate(rel):
            image, label = ds[i]
            with Image.open(src / r) as im:
                reference = np.asarray(im.convert("RGB"))
            assert image.dtype == np.uint8 and image.ndim == 3 and label == labels[i]
            np.testing.assert_array_equal(image, reference)
    assert not (out / "train_arrays.npz").exists() and not (out / "train.beton").exists()
    assert not (out / "val_files.txt").exists()  # --holdout 0


def test_holdout_is_carved_from_train_and_src_val_is_test(src, tmp_path):
    out = tmp_path / "out"
    prepare_tree(src, out, log=lambda _: None)  # default hold-out: 10 %, seed 0
    rel, labels = expected(src, "train")
    train = (out / "train_files.txt").read_text().splitlines()
    val = (out / "val_files.txt").read_text().splitlines()
    names = sorted(line.rsplit(" ", 1)[0].split("/", 1)[1] for line in train + val)
    assert names == sorted(r.split("/", 1)[1] for r in rel)  # disjoint and complete
    held = [line.rsplit(" ", 1)[0].split("/")[1] for line in val]
    # ant (3 images) and dog (2) give one each; cat has a single image and keeps it
    assert sorted(held) == ["ant", "dog"]
    assert os.path.realpath(out / "val") == os.path.realpath(src / "train")
    for line in val:  # the val split reads its images through its own link
        path, label = line.rsplit(" ", 1)
        image, got = FileListDataset(out, "val")[val.index(line)]
        assert got == int(label) and image.shape[2] == 3
        assert (out / path).is_file()
    assert len(FileListDataset(out, "test")) == len(expected(src, "val")[0])


def test_dali_reads_the_file_list(src, tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    out = tmp_path / "out"
    prepare_tree(src, out, holdout=0.0, log=lambda _: None)
    rel, labels = expected(src, "train")

    @dali.pipeline_def(batch_size=len(rel), num_threads=1, device_id=None)
    def pipe():
        data, label = dali.fn.readers.file(file_root=str(out),
                                           file_list=str(out / "train_files.txt"),
                                           random_shuffle=False)
        return data, label

    p = pipe()
    p.build()
    data, label = p.run()
    for i, r in enumerate(rel):
        assert np.array(data[i]).tobytes() == (src / r).read_bytes()
        assert int(np.array(label[i]).item()) == labels[i]


def test_arrays_need_one_size(src, tmp_path):
    with pytest.raises(DataError, match="--array-size"):
        prepare_tree(src, tmp_path / "out", arrays=True, log=lambda _: None)
    assert "arrays" not in find_prepared(tmp_path / "out").splits.get("train", {})
    prepare_tree(src, tmp_path / "out", arrays=True, array_size=8, holdout=0.0,
                 log=lambda _: None)
    ds = ArrayDataset(tmp_path / "out", "train")
    rel, labels = expected(src, "train")
    assert ds.images.shape == (len(rel), 8, 8, 3)
    np.testing.assert_array_equal(ds.labels, labels)
    with Image.open(src / rel[2]) as im:
        reference = np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(ds[2][0], reference)
    # val images all share one size: no resize needed there.
    val = tmp_path / "val_only"
    make_tree(val, {"val": VAL})
    prepare_tree(val, tmp_path / "out2", arrays=True, log=lambda _: None)
    assert ArrayDataset(tmp_path / "out2", "test").images.shape == (2, 10, 10, 3)


def test_beton_with_max_side(src, tmp_path):
    pytest.importorskip("ffcv")
    from ffcv.reader import Reader

    out = tmp_path / "out"
    prepare_tree(src, out, beton=True, max_side=16, holdout=0.0, log=lambda _: None)
    rel, labels = expected(src, "train")
    reader = Reader(str(out / "train.beton"))
    np.testing.assert_array_equal(np.asarray(reader.metadata["f1"]), labels)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    for meta, r in zip(reader.metadata["f0"], rel):
        with Image.open(src / r) as im:
            w, h = im.size
        assert max(meta["width"], meta["height"]) == min(16, max(w, h))
        with open(out / "train.beton", "rb") as f:
            f.seek(int(meta["data_ptr"]))
            decoded = Image.open(io.BytesIO(f.read(sizes[int(meta["data_ptr"])])))
            assert decoded.size == (meta["width"], meta["height"])


def test_rerun_skips_and_source_change_redoes(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_tree(src, out) == 0
    before = (out / "train_files.txt").stat().st_mtime_ns
    capsys.readouterr()
    assert run_tree(src, out) == 0
    assert "write " not in capsys.readouterr().out
    assert (out / "train_files.txt").stat().st_mtime_ns == before
    Image.new("RGB", (5, 5)).save(src / "train" / "cat" / "a.png")
    assert run_tree(src, out) == 0
    assert "train/cat/a.png 1" in (out / "train_files.txt").read_text().splitlines()
    assert len(FileListDataset(out, "train")) == 7


@pytest.mark.parametrize("build, match", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no split folders"),
    (lambda root: (root / "train").mkdir(parents=True), "no class folders"),
    (lambda root: (root / "train" / "cls").mkdir(parents=True), "no images"),
])
def test_bad_trees(tmp_path, build, match):
    root = tmp_path / "src"
    build(root)
    with pytest.raises(DataError, match=match):
        prepare_tree(root, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_val_class_unknown_to_train(tmp_path):
    root = make_tree(tmp_path / "src", {"train": {"ant": TRAIN["ant"]}, "val": VAL})
    with pytest.raises(DataError, match="'dog' is not among the classes"):
        prepare_tree(root, tmp_path / "out", log=lambda _: None)


def test_output_inside_source_is_refused(src, capsys):
    assert run_tree(src, src / "prepared") == 2
    assert "overlap" in capsys.readouterr().err
    assert not (src / "prepared").exists()


def test_settings_that_would_be_ignored_are_refused(src, tmp_path):
    with pytest.raises(DataError, match="max_side"):
        prepare_tree(src, tmp_path / "out", max_side=64, log=lambda _: None)
    with pytest.raises(DataError, match="array_size"):
        prepare_tree(src, tmp_path / "out", array_size=8, log=lambda _: None)


def test_concurrent_run_is_refused(src, tmp_path):
    import fcntl

    out = tmp_path / "out"
    prepare_tree(src, out, log=lambda _: None)
    with open(out / ".mixpipe-prepare", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another `mixpipe data prepare`"):
            prepare_tree(src, out, log=lambda _: None)
    prepare_tree(src, out, log=lambda _: None)  # lock released: fine again
