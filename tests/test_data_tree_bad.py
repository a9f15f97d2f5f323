"""``prepare tree`` on a realistic tree: files that are not images, empty class folders, and
worker processes that die. Nothing may hang; every error names the file and the fix."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mixpipe.cli import main
from mixpipe.data import DataError, FileListDataset, prepare_tree
from mixpipe.data.synthetic import TreeSpec, list_split, make_tree

#: no hold-out: these tests compare the train split with the whole of SRC/train
QUIET = dict(log=lambda _: None, workers=1, holdout=0.0)


@pytest.fixture
def bad_tree(tmp_path):
    return make_tree(str(tmp_path / "src"), TreeSpec(classes=2, train_per_class=4,
                                                     val_per_class=1, sides=(16, 40),
                                                     corrupt=2, seed=3))


def test_bad_files_fail_by_default_naming_each(bad_tree, tmp_path, capsys):
    assert main(["data", "prepare", "tree", "--src", bad_tree.root, "--out",
                 str(tmp_path / "out"), "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.startswith("mixpipe")]
    assert len(err) == 1, err
    err = err[0]
    for rel in bad_tree.corrupt:
        assert rel.split("/", 1)[1] in err
    assert "--on-bad skip" in err
    assert not (tmp_path / "out" / "train_files.txt").exists()


def test_skip_leaves_bad_files_out_and_lists_them(bad_tree, tmp_path):
    out = tmp_path / "out"
    prepare_tree(bad_tree.root, out, on_bad="skip", **QUIET)
    rows = list_split(bad_tree, "train")
    lines = (out / "train_files.txt").read_text().splitlines()
    assert lines == [f"{r} {y}" for r, y in rows]
    skipped = (out / "train_bad.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == sorted(
        r.split("/", 1)[1] for r in bad_tree.corrupt)
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in skipped)
    ds = FileListDataset(out, "train")
    assert len(ds) == len(rows) and ds[0][0].ndim == 3
    # the val split had nothing bad: an empty list
    assert (out / "val_bad.txt").read_text() == ""


@pytest.mark.slow
def test_skip_with_beton_does_not_hang(bad_tree, tmp_path):
    pytest.importorskip("ffcv")
    out = tmp_path / "out"
    # fail first (clear error, nothing hangs), then succeed with skip
    with pytest.raises(DataError, match="not readable images"):
        prepare_tree(bad_tree.root, out, beton=True, **QUIET)
    prepare_tree(bad_tree.root, out, beton=True, on_bad="skip", **QUIET)
    from ffcv.reader import Reader

    assert Reader(str(out / "train.beton")).num_samples == len(list_split(bad_tree, "train"))


def test_empty_class_folder_is_an_error_unless_allowed(tmp_path):
    tree = make_tree(str(tmp_path / "src"), TreeSpec(classes=2, train_per_class=2,
                                                     val_per_class=1, sides=(16, 24),
                                                     greyscale=0, cmyk=0, png_as_jpg=0,
                                                     empty_classes=1))
    with pytest.raises(DataError, match="with no images.*zz_empty00.*--allow-empty-classes"):
        prepare_tree(tree.root, tmp_path / "out", **QUIET)
    prepare_tree(tree.root, tmp_path / "out", allow_empty_classes=True, **QUIET)
    assert (tmp_path / "out" / "classes.txt").read_text().split() == [*tree.classes,
                                                                       "zz_empty00"]


def test_on_bad_is_checked(bad_tree, tmp_path):
    with pytest.raises(DataError, match="on_bad"):
        prepare_tree(bad_tree.root, tmp_path / "out", on_bad="ignore", **QUIET)


_DYING_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from mixpipe.data import DataError
    from mixpipe.data.writers import write_beton

    class Dying:
        def __len__(self):
            return 8
        def __getitem__(self, i):
            if i == int(sys.argv[2]):
                os._exit(7)  # a worker killed mid-write (OOM killer, a decoder crash)
            return np.zeros((8, 8, 3), np.uint8), 0

    import ffcv.writer
    from multiprocessing import Process
    try:
        write_beton(sys.argv[1], Dying(), 90, workers=2, page_size=1 << 21)
    except DataError as err:
        assert ffcv.writer.Process is Process, "the writer's Process class was not restored"
        print("DataError:", err)
        sys.exit(3)
""")


@pytest.mark.slow
@pytest.mark.parametrize("dies_at", [0, 5])
def test_a_dead_beton_worker_ends_the_run(tmp_path, dies_at):
    """A worker dying on its very first image (before any poll could see it alive) hung the
    run when the watcher asked ``active_children()``, which reaps the dead unseen."""
    pytest.importorskip("ffcv")
    script = tmp_path / "dying.py"
    script.write_text(_DYING_WRITER)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}  # this checkout's mixpipe, not an installed one
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "x.beton"), str(dies_at)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "exit code 7" in proc.stdout and "--workers 1" in proc.stdout


@pytest.mark.parametrize("chunks, dying", [(2500, 3), (40000, 0)])
def test_pool_worker_death_is_an_error_not_a_hang(chunks, dying):
    """A worker dies while results are collected, or (many chunks, the first one fatal) while
    the rest are still being submitted: the same one-line error either way."""
    from mixpipe.data.writers import parallel_map

    with pytest.raises(DataError, match="worker process died"):
        parallel_map(functools.partial(_die_on, dying), [[i] for i in range(chunks)], workers=2,
                     total=chunks, desc="test", sizes=[1] * chunks)


def test_a_failing_chunk_stops_the_pool_without_running_the_rest(tmp_path):
    """The error surfaces at once: the chunks not yet started are dropped, not worked through."""
    from mixpipe.data.writers import parallel_map

    with pytest.raises(ValueError, match="chunk 0 is broken"):
        parallel_map(functools.partial(_fail_first, str(tmp_path)), [[i] for i in range(2500)],
                     workers=2, total=2500, desc="test", sizes=[1] * 2500)
    assert len(os.listdir(tmp_path)) < 2500 // 2


def _fail_first(marks, chunk):
    if chunk[0] == 0:
        raise ValueError("chunk 0 is broken")
    time.sleep(0.002)
    open(os.path.join(marks, str(chunk[0])), "w").close()
    return chunk


def _die_on(dying, chunk):
    if chunk[0] == dying:
        os._exit(9)
    return chunk


def test_decode_problem_names_truncated_jpeg(tmp_path):
    from PIL import Image

    from mixpipe.data.writers import decode_problem

    path = tmp_path / "t.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    assert decode_problem(str(path)) is None
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert decode_problem(str(path)) is not None


@pytest.mark.slow
def test_a_beton_from_ffcvs_own_writer_is_accepted(tmp_path):
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from mixpipe.data import find_prepared

    class Tiny:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return np.full((8, 8, 3), 10 * i, np.uint8), i % 2

    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    for split in ("train", "val"):
        DatasetWriter(str(root / f"{split}.beton"), {"image": RGBImageField(),
                                                     "label": IntField()},
                      num_workers=1).from_indexed_dataset(Tiny())
    prepared = find_prepared(str(root))
    assert prepared.path("train", "beton") == str(root / "train.beton")
    assert prepared.samples == {"train": 6, "val": 6} and prepared.classes == ("a", "b")
    # other field names are not what the loaders read: not listed
    DatasetWriter(str(root / "val.beton"), {"img": RGBImageField(), "y": IntField()},
                  num_workers=1).from_indexed_dataset(Tiny())
    with pytest.raises(DataError, match="no complete 'beton'"):
        find_prepared(str(root)).path("val", "beton")
