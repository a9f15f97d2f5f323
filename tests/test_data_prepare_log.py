"""What ``mixpipe data prepare`` prints is read by a person (issue 30): a first run announces
each artifact it writes, without a reason that reads like a failure."""
from __future__ import annotations

from mixpipe.cli import main
from mixpipe.data import prepare_tree
from mixpipe.data.synthetic import TreeSpec, make_tree

SMALL = TreeSpec(classes=2, train_per_class=3, val_per_class=1, sides=(16, 40))


def _lines(text: str):
    return [line for line in text.splitlines() if line.strip()]


def test_prepare_tree_first_run_names_artifacts_without_a_stale_reason(tmp_path, capsys):
    tree = make_tree(str(tmp_path / "src"), SMALL)
    out = tmp_path / "out"
    assert main(["data", "prepare", "tree", "--src", tree.root, "--out", str(out),
                 "--workers", "1", "--holdout", "0"]) == 0
    printed = capsys.readouterr()
    logged = _lines(printed.out) + _lines(printed.err)
    assert not [line for line in logged if "not written yet" in line]
    # still announced: every artifact on disk is named on a "write" line of its own
    written = {line.split()[1].rstrip(":") for line in logged if line.startswith("write ")}
    for name in ("classes.txt", "train_files.txt", "test_files.txt"):
        assert (out / name).exists() and name in written


def test_prepare_cifar10_first_run_has_no_not_written_yet(tmp_path, capsys):
    from test_data_cifar10 import make_batches

    make_batches(tmp_path / "cifar-10-batches-py")
    assert main(["data", "prepare", "cifar10", "--src", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--workers", "1", "--no-beton"]) == 0
    printed = capsys.readouterr()
    assert "not written yet" not in printed.out + printed.err
    assert (tmp_path / "out" / "classes.txt").exists()


def test_rebuild_still_says_why(tmp_path):
    """A rebuild of something that was there is worth a reason; only the first write is not."""
    tree = make_tree(str(tmp_path / "src"), SMALL)
    out = tmp_path / "out"
    prepare_tree(tree.root, str(out), workers=1, holdout=0.0, log=lambda _: None)
    with open(out / "classes.txt", "a") as f:
        f.write("extra\n")
    logged = []
    prepare_tree(tree.root, str(out), workers=1, holdout=0.0, log=logged.append)
    assert "write classes.txt: its content changed since it was written (size differs)" \
        in logged
