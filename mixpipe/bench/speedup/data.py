"""The speed-up benchmark's data: the training split and the split it scores."""
from __future__ import annotations

import os
from typing import Any, Callable, Tuple

from mixpipe.data.subset import FirstN

from .settings import FASHION, SpeedupSettings

__all__ = ["load_data"]


def load_data(s: SpeedupSettings, log: Callable[..., None] = print) -> Tuple[Any, Any, int]:
    """``(train, eval, num_classes)``; prepares Fashion-MNIST on first use.

    ``eval`` is the split ``s.eval_split`` names: ``val`` (held out of the training images, where
    settings are chosen) or ``test`` (scored once, for the record).
    """
    from mixpipe.data import ArrayDataset, DataError, FileListDataset, find_prepared

    root = s.prepared_root
    if s.data == FASHION:
        arrays = [os.path.join(root, f"{split}_arrays.npz") for split in ("train", "val", "test")]
        if not all(os.path.exists(p) for p in arrays):
            from mixpipe.data import prepare_fashion_mnist

            log(f"preparing Fashion-MNIST in {root} (once)")
            prepare_fashion_mnist(root, log=log)
    elif not os.path.isdir(root):
        raise SystemExit(f"--data {root}: not a directory; give 'fashion-mnist' or a directory "
                         "written by `mixpipe data prepare tree --src TREE --out DIR`")
    if not os.path.exists(os.path.join(root, "classes.txt")):
        raise SystemExit(f"--data {root}: not a prepared directory (no classes.txt); prepare "
                         f"the class-folder tree first: mixpipe data prepare tree --src {root} "
                         f"--out {root.rstrip('/')}-prepared, then pass --data "
                         f"{root.rstrip('/')}-prepared")
    try:
        prepared = find_prepared(root, ("train", "val", "test"))
    except DataError as err:
        raise SystemExit(f"--data {root}: {err}") from None
    kinds = prepared.splits.get("train", {})
    if "arrays" in kinds:
        dataset = ArrayDataset
    elif "files" in kinds:
        dataset = FileListDataset
    else:
        raise SystemExit(f"--data {root}: no prepared train split; run `mixpipe data prepare "
                         f"tree --src TREE --out {root}` first")
    if s.eval_split not in prepared.splits:
        raise SystemExit(f"--data {root}: no prepared {s.eval_split!r} split (has: "
                         f"{sorted(prepared.splits)}); prepare it again with a hold-out "
                         "(`mixpipe data prepare ... --holdout 0.1`) or pick --eval "
                         f"{'test' if s.eval_split == 'val' else 'val'}")
    train, scored = dataset(root, "train"), dataset(root, s.eval_split)
    return FirstN(train, s.limit), FirstN(scored, s.eval_limit), len(prepared.classes)
