"""The held-out folder of a class-folder tree may be named ``val/`` (ImageNet) or ``test/``
(CIFAR-10 copies, Kaggle sets); either becomes the prepared ``test`` split."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mixpipe.cli import main
from mixpipe.data import DataError, FileListDataset, prepare_tree

CLASSES = ("bird", "cat")


def make_tree(root, folders, per_class=3, seed=0):
    """Tiny JPEGs in ``root/<folder>/<class>/<i>.jpg``; returns the relpaths per folder."""
    rng = np.random.default_rng(seed)
    made = {}
    for folder in folders:
        made[folder] = []
        for cls in CLASSES:
            (root / folder / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / cls / f"{i}.jpg", quality=90)
                made[folder].append(f"{cls}/{i}.jpg")
    return made


def listed(out, split):
    """The relpaths of ``OUT/<split>_files.txt`` without the leading split folder."""
    lines = (out / f"{split}_files.txt").read_text().splitlines()
    return [line.rsplit(" ", 1)[0].split("/", 1)[1] for line in lines]


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_either_name_becomes_the_test_split(tmp_path, held_out):
    made = make_tree(tmp_path / "src", ["train", held_out])
    out = tmp_path / "out"
    logged = []
    prepare_tree(tmp_path / "src", out, holdout=0.0, workers=1, log=logged.append)
    assert sorted(listed(out, "test")) == sorted(made[held_out])
    assert sorted(listed(out, "train")) == sorted(made["train"])
    assert os.path.realpath(out / "test") == os.path.realpath(tmp_path / "src" / held_out)
    test = FileListDataset(out, "test")
    assert len(test) == len(made[held_out]) and test.classes == list(CLASSES)
    assert not any("warning" in line for line in logged)


def test_both_names_is_a_one_line_error(tmp_path, capsys):
    make_tree(tmp_path / "src", ["train", "val", "test"])
    code = main(["data", "prepare", "tree", "--src", str(tmp_path / "src"), "--out",
                 str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "val/" in err and "test/" in err and "rename" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(DataError):
        prepare_tree(tmp_path / "src", tmp_path / "out2", log=lambda _: None)


def test_neither_name_warns_and_prepares_train_and_val(tmp_path):
    make_tree(tmp_path / "src", ["train"], per_class=4)
    out = tmp_path / "out"
    logged = []
    paths = prepare_tree(tmp_path / "src", out, workers=1, log=logged.append)
    warnings = [line for line in logged if "warning" in line]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "val/" in warnings[0] and "test/" in warnings[0]
    assert "train_files" in paths and "val_files" in paths and "test_files" not in paths
    assert len(listed(out, "train")) + len(listed(out, "val")) == 4 * len(CLASSES)
