"""MixLoader with several FFCV workers gives the one-worker composites, bit for bit.

With ``num_workers`` > 1 FFCV compiles the decoders with ``parallel=True`` and ``prange``; numba
then hoisted the BLEND accumulator allocated inside the decoder's loop out of it, every slot got
the 1x1 placeholder, and BLEND composites kept stale pixels of an earlier batch
(:func:`mixpipe.ffcv.kernels.accumulator`). Each worker count runs in its own process, so a
crash fails the test instead of killing pytest; NUMBA_NUM_THREADS is raised so that 4 threads
run on any machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 48

_WRITE = textwrap.dedent("""
    import sys
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:  # JPEGs of varied sizes, so constituents are resized and cropped
        def __len__(self):
            return {n}

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            h, w = 24 + 8 * (i % 4), 28 + 6 * (i % 5)
            y, x = np.mgrid[0:h, 0:w]
            img = np.stack([(x * 7 + i * 11) % 256, (y * 5 + i * 3) % 256,
                            ((x // 4 + y // 4) % 2) * 160 + 40], axis=-1).astype(np.float64)
            img += rng.normal(0, 12, img.shape)
            return np.clip(img, 0, 255).astype(np.uint8), i % 10

    DatasetWriter(sys.argv[1], {{"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                "label": IntField()}}, num_workers=1).from_indexed_dataset(
        Images())
""").format(n=N)

_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    from mixpipe.core.plan import Layout, MixPlan
    from mixpipe.ffcv import MixLabelDecoder, MixLoader, RandomResizedCropMixDecoder

    beton, workers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    N = {n}

    def plan(seed):  # every layout, K up to 4, some ids skipped
        rng = np.random.default_rng(seed)
        rest = rng.permutation(N).tolist()
        skipped, rest = rest[:3], rest[3:]
        cycle = [(Layout.BLEND, 2), (Layout.HALVES, 2), (Layout.QUADS, 4), (Layout.SINGLE, 1),
                 (Layout.BLEND, 3), (Layout.BLEND, 4)]
        slots, i = [], 0
        while rest:
            layout, k = cycle[i % len(cycle)]
            i += 1
            if k > len(rest):
                layout, k = Layout.SINGLE, 1
            ids, rest = rest[:k], rest[k:]
            w = rng.dirichlet(np.ones(k)).astype(np.float32)
            w[-1] = np.float32(1.0) - w[:-1].sum(dtype=np.float32)
            slots.append((ids, w.tolist(), layout))
        return MixPlan.from_slots(slots, N, skipped=skipped, seed=seed).validate()

    class Plans:
        def plan(self, epoch, rank=0, world_size=1):
            p = plan(epoch)
            return MixPlan(p.ids, p.weights, p.loss_scale, p.layout, p.skipped, p.num_samples,
                           epoch, p.seed, rank, world_size)

    arrays = {{}}
    for resize in ("reference", "fast"):
        loader = MixLoader(beton, 8, Plans(), num_workers=workers, pipelines={{
            "image": [RandomResizedCropMixDecoder((32, 32), (0.35, 1.0), stride=8,
                                                  flip_prob=0.5, resize=resize)],
            "label": [MixLabelDecoder()]}})
        for epoch in range(3):
            loader.set_epoch(epoch)
            fields = {{"image": [], "layout": [], "ids": [], "weights": []}}
            for batch in loader:  # copied now: FFCV reuses its batch buffers
                for field, rows in fields.items():
                    rows.append(getattr(batch, field).numpy().copy())
            for field, rows in fields.items():
                arrays[f"{{resize}}-{{field}}-{{epoch}}"] = np.concatenate(rows)
        loader.close()
    np.savez(out, **arrays)
""").format(n=N)


def _python(args, cwd, threads=4):
    env = {**os.environ, "PYTHONPATH": REPO, "NUMBA_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


@pytest.mark.slow
def test_several_workers_give_the_one_worker_composites(tmp_path):
    pytest.importorskip("ffcv")
    (tmp_path / "write.py").write_text(_WRITE)
    (tmp_path / "run.py").write_text(_RUN)
    beton = str(tmp_path / "t.beton")
    proc = _python(["write.py", beton], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for workers in (1, 2, 4):
        out = str(tmp_path / f"w{workers}.npz")
        proc = _python(["run.py", beton, str(workers), out], tmp_path)
        assert proc.returncode == 0, (f"num_workers={workers} exited with {proc.returncode}:\n"
                                      + proc.stderr[-3000:])
        results[workers] = dict(np.load(out))
    want = results[1]
    for workers in (2, 4):
        got = results[workers]
        assert sorted(got) == sorted(want)
        for name in sorted(want):
            a, b = want[name], got[name]
            assert a.shape == b.shape, (workers, name, a.shape, b.shape)
            if not np.array_equal(a, b):
                bad = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
                resize, _, epoch = name.split("-")
                layouts = want[f"{resize}-layout-{epoch}"][bad].tolist()
                pytest.fail(f"num_workers={workers}: {name} differs from num_workers=1 in rows "
                            f"{bad.tolist()} (layouts {layouts})")


_FIT = textwrap.dedent("""
    import sys
    import torch
    from ffcv.transforms import ToTensor, ToTorchImage
    from mixpipe.core.policies.mixtrain import MixTrainSettings
    from mixpipe.ffcv import MixLabelDecoder, MixLoader, RandomResizedCropMixDecoder
    from mixpipe.server import InProcessService
    from mixpipe.train import adapt, build_model, fit

    torch.manual_seed(0)
    service = InProcessService({n}, MixTrainSettings(epochs=2))
    decode = RandomResizedCropMixDecoder((32, 32), (0.35, 1.0), stride=8, flip_prob=0.5)
    # 13 slots a batch: odd batches, as a plan's last batch often is
    loader = MixLoader(sys.argv[1], 13, service, num_workers=2,
                       pipelines={{"image": [decode, ToTensor(), ToTorchImage()],
                                  "label": [MixLabelDecoder(), ToTensor()]}})
    net = adapt(build_model("resnet-tiny", 10), stride=8)
    fit(net, loader, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), 2, progress=False)
    print("threads", torch.get_num_threads())
""").format(n=N)


@pytest.mark.slow
def test_fit_with_two_workers_and_channels_last_images_does_not_crash(tmp_path):
    """The README/example path with ``num_workers=2``: FFCV's ToTorchImage() hands NHWC memory,
    FFCV sets torch to 2 threads, and torch 2.13's CPU backward crashed on odd batches
    (``free(): invalid next size``) until Normalize made its input NCHW."""
    pytest.importorskip("ffcv")
    (tmp_path / "write.py").write_text(_WRITE)
    (tmp_path / "fit.py").write_text(_FIT)
    beton = str(tmp_path / "t.beton")
    proc = _python(["write.py", beton], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _python(["fit.py", beton], tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("threads 2"), proc.stdout[-500:]
