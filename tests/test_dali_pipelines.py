"""The ready DALI pipelines (pipelines/dali_*.py) on a tiny prepared tree, CPU-only."""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
from PIL import Image  # noqa: E402

from mixpipe.core.plan import Layout  # noqa: E402
from mixpipe.dali import close_pipeline  # noqa: E402
from mixpipe.dali.pipeline import PipelineSettings  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pipelines import dali_imagenet, dali_small  # noqa: E402


def write_prepared(root, n_train: int, n_val: int, size: int) -> None:
    """The layout `mixpipe data prepare` writes: OUT/<split>/<class>/<i>.jpg + file lists."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            label = i % 3
            rel = f"{split}/class{label}/{i:06d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=80)
            path.write_bytes(buf.getvalue())
            lines.append(f"{rel} {label}\n")
        (root / f"{split}_files.txt").write_text("".join(lines))


class _Pairs:
    """Half the samples in HALVES pairs, the rest single; a fresh pairing per epoch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def plan(self, epoch, rank=0, world_size=1):
        from mixpipe.core.plan import MixPlan

        perm = np.random.default_rng(epoch).permutation(self.n)
        half = (self.n // 4) * 2
        slots = [([int(a), int(b)], [0.5, 0.5], Layout.HALVES) for a, b in
                 perm[:half].reshape(-1, 2)]
        slots += [([int(i)], [1.0], Layout.SINGLE) for i in perm[half:]]
        return MixPlan.from_slots(slots, self.n, epoch=epoch)


@pytest.mark.slow
def test_small_pipeline_trains_on_the_prepared_tree_and_delivers_every_sample(tmp_path):
    write_prepared(tmp_path, 14, 5, 32)
    loader = dali_small.train_loader(str(tmp_path), batch_size=4, plans=_Pairs(14),
                                     device_id=None, num_threads=1, py_num_workers=2,
                                     py_start_method="fork")
    with loader:
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen = []
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                assert b.image.shape == (4, 3, 32, 32) and b.image.dtype.is_floating_point
                assert b.targets.shape == b.ids.shape == (4, 4)
                real = (b.loss_scale > 0) & (b.ids >= 0)
                seen += b.ids[real].tolist()
                np.testing.assert_array_equal(b.targets[real].numpy(),
                                              b.ids[real].numpy() % 3)
            assert sorted(seen) == list(range(14))


def test_val_pipelines_read_in_order_and_normalise(tmp_path):
    write_prepared(tmp_path, 3, 6, 40)
    for module, size in ((dali_small, 32), (dali_imagenet, 224)):
        pipe = module.val(str(tmp_path), batch_size=3, device_id=None, num_threads=1)
        try:
            pipe.build()
            images, labels = pipe.run()
            arr = np.array(images.as_tensor())
            assert arr.shape == (3, 3, size, size)
            assert np.array(labels.as_tensor()).reshape(-1).tolist() == [0, 1, 2]
            assert abs(float(arr.mean())) < 3  # normalised, not 0-255
        finally:
            close_pipeline(pipe)


@pytest.mark.slow
def test_imagenet_cli_runs_batches_and_prints_throughput(tmp_path, capsys):
    write_prepared(tmp_path, 12, 2, 64)
    code = dali_imagenet.cli_main(dali_imagenet.SETTINGS, "test", [
        "--data", str(tmp_path), "--cpu", "--batch-size", "4", "--batches", "4", "--workers",
        "1", "--threads", "1", "--start-method", "fork", "--mix", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "batch: image (4, 3, 224, 224) torch.float32" in out
    assert "source images/s" in out and "HALVES" in out


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="stride"):
        PipelineSettings(size=(32, 32), stride=32)
    with pytest.raises(ValueError, match="scale"):
        PipelineSettings(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        PipelineSettings(std=(1.0, 0.0, 1.0))
