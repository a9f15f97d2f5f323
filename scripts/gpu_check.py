"""``make gpu-check``: the first run of mixpipe on a GPU, sized for the machine that will run it.

No line of mixpipe had run on a GPU, and the GPU machine at hand is bare: Python with CUDA torch
and torchvision, no DALI, no FFCV, no pyzmq, no network, and minutes of GPU time. So this script
needs nothing beyond the repository on ``PYTHONPATH``, generates its own data, checks the torch
path on CUDA within a time budget (270 s by default, its training shrinking on a slow host), and
writes what it found under ``--out``:

* ``composites``: the torch loader's composites (a deterministic view of every constituent)
  against the core composer, bit for bit, and the core's torch composer on CUDA against it
  within one intensity level;
* ``pooling_loss``: region pooling and the mixed loss on CUDA against the CPU on the same batch;
* ``host_cost``: CPU-seconds per source image of the mixing torch loader against a plain torch
  loader (pillow decode, random resized crop, flip), at 0 / 50 / 90 % mixed;
* ``training``: ``tv:resnet18`` at 224 px (channels_last, bf16 autocast where the GPU has it),
  arms ``none`` and ``mixtrain`` side by side through :func:`mixpipe.train.fit`: images/s,
  composites/s, GPU busy share (CUDA events, and ``nvidia-smi`` when present), the share of
  the plan's speed-up bound achieved, and each step's data-wait share;
* ``dali`` and ``ffcv``: their GPU parts, each skipped with one line when the library does not
  import.

Output: ``OUT/gpu_check.json`` (rewritten after every check, so a run cut short keeps what it
measured) and ``OUT/gpu_check.log``; one summary line per check; exit 1 if a check fails.
Without CUDA it prints one line and exits 0 (``--require-gpu``: 1). ``--cpu-dry-run`` runs the
same code on the CPU at a tiny size, to test this script; its figures say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PREFIX = "gpu-check:"
#: what a check's status may be; the run fails if any check is FAIL
PASS, FAIL, SKIP = "pass", "fail", "skip"


# ----------------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each check runs. Two presets: the GPU run, and the dry run that tests this
    script on a shared CPU in well under a minute."""

    image: int  #: composite side in px
    stride: int  #: the model's total stride (region boundaries snap to it)
    model: str  #: mixpipe.bench.speedup.arms.build_model name
    classes: int
    train_per_class: int
    val_per_class: int
    sides: Tuple[int, int]  #: shorter side of the generated JPEGs
    epochs: int
    batch: int  #: training batch in samples (mixing arms: samples on average)
    composite_slots: int
    host_images: int  #: source images per host-cost run
    host_repeats: int
    host_batch: int


GPU = Sizes(image=224, stride=32, model="tv:resnet18", classes=10, train_per_class=400,
            val_per_class=10, sides=(256, 500), epochs=3, batch=128, composite_slots=48,
            host_images=512, host_repeats=2, host_batch=32)
DRY = Sizes(image=32, stride=8, model="resnet-tiny", classes=4, train_per_class=10,
            val_per_class=2, sides=(40, 80), epochs=2, batch=16, composite_slots=12,
            host_images=32, host_repeats=1, host_batch=8)
#: a composite may differ from the reference by this many intensity levels, on at most this
#: share of its values, where float32 sums run in another order (the core's torch composer)
LEVEL_TOLERANCE, LEVEL_SHARE = 1, 0.01
#: relative tolerance of CUDA against the CPU in float32 with TF32 off: pooling and loss alone,
#: and through a whole adapted network (cuDNN picks other convolution algorithms)
POOL_RTOL, NETWORK_RTOL = 1e-5, 1e-3
#: mixing loader's CPU-seconds per source image at most this many times the plain loader's
HOST_TARGET = 1.05


# ----------------------------------------------------------------------------------- output
class Log:
    """Every line to stdout and to the log under --out, flushed as written: a device run copies
    back only what is under --out, and a run stopped by its time limit must leave its log."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "w", buffering=1, encoding="utf-8")

    def __call__(self, *parts: Any) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        self.file.write(text + "\n")

    def close(self) -> None:
        self.file.close()


@dataclasses.dataclass
class Check:
    """One check's verdict: its status, the one-line figure, and the details for the JSON."""

    name: str
    status: str
    summary: str
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        return f"{PREFIX} {self.name} {self.status.upper()}: {self.summary}"


@dataclasses.dataclass
class Context:
    """What every check needs: where the data is, which device, at which size."""

    sizes: Sizes
    dry: bool
    device: Any  # torch.device
    data: str  # the prepared directory
    workdir: str
    workers: int
    log: Log
    host_target: float = HOST_TARGET
    deadline: Optional[float] = None  #: time.perf_counter() by which the run should be done
    loader_rate: Optional[float] = None  #: mixing loader's source images/s, from host_cost

    def seconds_left(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _stats(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(ordered), "mean": statistics.fmean(ordered),
            "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)],
            "max": ordered[-1]}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


# ----------------------------------------------------------------------------------- data
def _write_images(job: Tuple[str, List[Tuple[str, int, int, int]]]) -> int:
    """Write one chunk of the generated tree (in a forked writer process)."""
    import numpy as np
    from PIL import Image

    from mixpipe.data.synthetic import photo_like

    root, items = job
    for rel, height, width, seed in items:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image = photo_like(height, width, np.random.default_rng(seed))
        Image.fromarray(image).save(path, format="JPEG", quality=90)
    return len(items)


def generate_tree(root: str, sizes: Sizes, workers: int) -> str:
    """A class-folder tree ``root/{train,val}/cNN/*.jpg`` of photo-like JPEGs, each of its own
    size (shorter side in ``sizes.sides``, aspect up to 1.5), written by ``workers`` processes.

    :func:`mixpipe.data.synthetic.make_tree` writes the same kind of pictures but one by one,
    and four thousand of them would eat a quarter of the GPU run's minutes."""
    import numpy as np

    rng = np.random.default_rng(0)
    items = []
    for split, per_class in (("train", sizes.train_per_class), ("val", sizes.val_per_class)):
        for c in range(sizes.classes):
            for i in range(per_class):
                short = int(rng.integers(sizes.sides[0], sizes.sides[1] + 1))
                long = int(short * rng.uniform(1.0, 1.5))
                h, w = (short, long) if rng.random() < 0.5 else (long, short)
                items.append((f"{split}/c{c:02d}/{i:05d}.jpg", h, w, int(rng.integers(1 << 31))))
    if workers <= 1:
        _write_images((root, items))
        return root
    # forked processes take their chunk without pickling, so this works however the script was
    # started (python, runpy, an import)
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_write_images, args=((root, items[i::workers]),))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} image writers failed (exit codes "
                           f"{failed})")
    return root


def prepare_data(ctx_log: Log, workdir: str, sizes: Sizes, workers: int) -> str:
    """Generate the tree and prepare it as a user would (``mixpipe data prepare tree``): train,
    a held-out val split, test."""
    from mixpipe.data import prepare_tree

    started = time.perf_counter()
    src = generate_tree(os.path.join(workdir, "src"), sizes, workers)
    generated = time.perf_counter() - started
    out = os.path.join(workdir, "prepared")
    prepare_tree(src, out, workers=max(1, workers), log=lambda *a: ctx_log("  prepare:", *a))
    ctx_log(f"{PREFIX} data: {sizes.classes * (sizes.train_per_class + sizes.val_per_class)} "
            f"JPEGs (shorter side {sizes.sides[0]}-{sizes.sides[1]} px) generated in "
            f"{generated:.1f}s, prepared in {time.perf_counter() - started - generated:.1f}s")
    return out


# ----------------------------------------------------------------------------------- composites
class CentreView:
    """The deterministic view: every constituent centre-cropped and resized (pillow) to one
    square a quarter larger than the composite, whatever region it goes to. The loader's random
    generator then plays no part, so the reference can rebuild the very same constituents, and
    the composer still resizes every one of them (BLEND too)."""

    def __init__(self, side: int) -> None:
        self.side = int(side)

    def __call__(self, image: Any, region: Tuple[int, int], rng: Any) -> Any:
        from mixpipe.train.evaluate import center_crop

        return center_crop(image, (self.side, self.side), 1.0)


def layout_plan(num_samples: int, slots: int, cells: int, seed: int = 0) -> Any:
    """A plan of every layout in turn (SINGLE, HALVES at each stride split, QUADS, BLEND of 2-4),
    constituents drawn without repeats."""
    import numpy as np

    from mixpipe.core.plan import Layout, MixPlan

    rng = np.random.default_rng(seed)
    order = rng.permutation(num_samples).tolist()
    cycle = (Layout.SINGLE, Layout.HALVES, Layout.QUADS, Layout.BLEND)
    rows, at = [], 0
    for i in range(slots):
        layout = cycle[i % len(cycle)]
        k = {Layout.SINGLE: 1, Layout.HALVES: 2, Layout.QUADS: 4}.get(layout, 2 + (i // 4) % 3)
        if at + k > num_samples:
            break
        if layout == Layout.HALVES:
            split = 1 + (i // 4) % (cells - 1)
            weights = [split / cells, 1.0 - split / cells]
        elif layout == Layout.QUADS:
            weights = [0.25] * 4
        elif layout == Layout.BLEND:
            w = rng.dirichlet(np.ones(k)).astype(np.float32)
            w[-1] = np.float32(1.0) - w[:-1].sum(dtype=np.float32)
            weights = w.tolist()
        else:
            weights = [1.0]
        rows.append((order[at:at + k], weights, layout))
        at += k
    return MixPlan.from_slots(rows, num_samples)


def _composite_loader(ctx: Context, dataset: Any, plan: Any, batch_size: int) -> Any:
    from mixpipe.torch import FixedPlans, MixedLoader

    s = ctx.sizes
    return MixedLoader(dataset, FixedPlans(plan), batch_size, (s.image, s.image), s.stride,
                       num_workers=min(ctx.workers, 2), shuffle=False,
                       constituent_transform=CentreView(s.image * 5 // 4), max_constituents=4,
                       pin_memory=ctx.cuda)


def check_composites(ctx: Context) -> Check:
    import numpy as np
    import torch

    from mixpipe.core.compose import compose_batch, compose_slot
    from mixpipe.data import FileListDataset

    s = ctx.sizes
    dataset = FileListDataset(ctx.data, "train")
    plan = layout_plan(len(dataset), s.composite_slots, s.image // s.stride)
    view = CentreView(s.image * 5 // 4)
    loader = _composite_loader(ctx, dataset, plan, 8)
    loader.set_epoch(0)
    views: Dict[int, np.ndarray] = {}

    def constituent(i: int) -> np.ndarray:
        if i not in views:
            views[i] = view(dataset[i][0], (s.image, s.image), None)
        return views[i]

    exact = differing = values = 0
    worst = 0
    fields: Dict[str, List[np.ndarray]] = {"ids": [], "weights": [], "layout": [], "targets": []}
    for batch in loader:
        got = batch.image.to(ctx.device, non_blocking=True)
        ids, weights = batch.ids.numpy(), batch.weights.numpy()
        layout = batch.layout.numpy()
        for key in fields:
            fields[key].append(getattr(batch, key).numpy())
        refs, parts = [], torch.zeros((len(ids), 4, 3, view.side, view.side), dtype=torch.uint8)
        for row in range(len(ids)):
            members = [int(i) for i in ids[row] if i >= 0]
            images = [constituent(i) for i in members]
            refs.append(compose_slot(images, weights[row, :len(members)].tolist(), layout[row],
                                     (s.image, s.image), s.stride))
            for j, image in enumerate(images):
                parts[row, j] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        ref = torch.from_numpy(np.stack(refs)).permute(0, 3, 1, 2).to(ctx.device)
        exact += int((got == ref).flatten(1).all(dim=1).sum())
        on_device = compose_batch(parts.to(ctx.device), batch.weights.to(ctx.device),
                                  batch.layout, size=(s.image, s.image), stride=s.stride)
        diff = (on_device.int() - ref.int()).abs()
        worst = max(worst, int(diff.max()))
        differing += int((diff > 0).sum())
        values += diff.numel()
    loader.close()
    labels = np.asarray(dataset.labels)
    want_targets = np.where(plan.ids >= 0, labels[np.maximum(plan.ids, 0)], -1)
    meta = {key: bool(np.array_equal(np.concatenate(fields[key]), want))
            for key, want in (("ids", plan.ids), ("weights", plan.weights),
                              ("layout", plan.layout), ("targets", want_targets))}
    share = differing / max(values, 1)
    layouts = sorted({int(v) for v in plan.layout})
    ok = (exact == plan.num_slots and all(meta.values()) and worst <= LEVEL_TOLERANCE
          and share <= LEVEL_SHARE)
    details = {"slots": plan.num_slots, "layouts": layouts, "view_side": view.side,
               "loader_bit_exact_slots": exact, "metadata_equal": meta,
               "device_composer_max_level_diff": worst, "device_composer_share_differing": share,
               "tolerance": {"levels": LEVEL_TOLERANCE, "share": LEVEL_SHARE},
               "device": str(ctx.device)}
    return Check("composites", PASS if ok else FAIL,
                 f"torch loader {exact}/{plan.num_slots} composites bit-exact against "
                 f"compose_slot (all 4 layouts, on {ctx.device}); compose_batch on "
                 f"{ctx.device} max {worst} level, {100 * share:.3f}% of values differ "
                 f"(tolerance {LEVEL_TOLERANCE} level, {100 * LEVEL_SHARE:g}%)", details)


# ----------------------------------------------------------------------------------- pooling
@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """TF32 off while CUDA is compared with the CPU: with it, matrix products round to 10 bits
    and no tolerance that catches a real error would hold."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: Any, b: Any) -> float:
    """Largest difference of ``a`` (on the device) from ``b`` (CPU), relative to ``b``'s scale."""
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def check_pooling_loss(ctx: Context) -> Check:
    import torch

    from mixpipe.bench.speedup.arms import build_model
    from mixpipe.data import FileListDataset
    from mixpipe.train import Normalize, RegionMasks, adapt, batch_loss, region_pool

    s = ctx.sizes
    dataset = FileListDataset(ctx.data, "train")
    loader = _composite_loader(ctx, dataset, layout_plan(len(dataset), 16, s.image // s.stride,
                                                         seed=1), 16)
    loader.set_epoch(0)
    batch = next(iter(loader))
    loader.close()
    b, k = batch.weights.shape
    fh = fw = s.image // s.stride
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(b, 64, fh, fw, generator=gen)
    out: Dict[str, Any] = {"batch": b, "layouts": sorted(set(batch.layout.tolist()))}
    with _exact_float32():
        masks = RegionMasks(s.stride)(batch.layout, batch.weights, (s.image, s.image), (fh, fw))
        masks_dev = RegionMasks(s.stride)(batch.layout, batch.weights.to(ctx.device),
                                          (s.image, s.image), (fh, fw), device=ctx.device)
        out["masks_equal"] = bool(torch.equal(masks_dev.cpu(), masks))
        pooled = region_pool(features, masks)
        out["region_pool_rel"] = _rel(region_pool(features.to(ctx.device), masks_dev), pooled)
        # the loss and its gradient alone, on logits both devices share
        logits = torch.randn(b, k, 10, generator=gen)
        targets = batch.targets.clamp_max(9)
        batch10 = batch._replace(targets=torch.where(batch.targets >= 0, targets, -1))
        results = {}
        for where, device in (("cpu", torch.device("cpu")), ("device", ctx.device)):
            x = logits.detach().to(device).clone().requires_grad_(True)  # a leaf per device
            loss = batch_loss(x, batch10)
            loss.loss.backward()
            results[where] = (loss.loss, loss.per_constituent, x.grad, loss.real)
        out["loss_rel"] = _rel(results["device"][0], results["cpu"][0])
        out["per_constituent_rel"] = _rel(results["device"][1], results["cpu"][1])
        out["loss_grad_rel"] = _rel(results["device"][2], results["cpu"][2])
        out["real_equal"] = bool(torch.equal(results["device"][3].cpu(), results["cpu"][3]))
        # and through the adapted model the training check trains (eval mode: no batch stats)
        torch.manual_seed(0)
        net = adapt(build_model(s.model, s.classes), stride=s.stride).eval()
        net_dev = copy.deepcopy(net).to(ctx.device)
        images = Normalize()(batch.image)
        with torch.no_grad():
            cpu_logits = net(images, batch.layout, batch.weights)
            dev_logits = net_dev(images.to(ctx.device), batch.layout,
                                 batch.weights.to(ctx.device))
        out["network_logits_rel"] = _rel(dev_logits, cpu_logits)
        out["network_loss_rel"] = _rel(batch_loss(dev_logits, batch).loss,
                                       batch_loss(cpu_logits, batch).loss)
    small = [out["region_pool_rel"], out["loss_rel"], out["per_constituent_rel"],
             out["loss_grad_rel"]]
    ok = (out["masks_equal"] and out["real_equal"] and max(small) <= POOL_RTOL
          and max(out["network_logits_rel"], out["network_loss_rel"]) <= NETWORK_RTOL)
    out.update(model=s.model, tolerance={"pool_and_loss_rel": POOL_RTOL,
                                         "network_rel": NETWORK_RTOL}, device=str(ctx.device),
               tf32=False)
    return Check("pooling_loss", PASS if ok else FAIL,
                 f"{ctx.device} against CPU, float32: masks "
                 f"{'equal' if out['masks_equal'] else 'DIFFER'}, region_pool "
                 f"{out['region_pool_rel']:.1e}, mixed loss {out['loss_rel']:.1e} (grad "
                 f"{out['loss_grad_rel']:.1e}) (<= {POOL_RTOL:g}); adapted {s.model} logits "
                 f"{out['network_logits_rel']:.1e} (<= {NETWORK_RTOL:g})", out)


# ----------------------------------------------------------------------------------- host cost
def check_host_cost(ctx: Context) -> Check:
    from torch.utils.data import DataLoader

    from mixpipe.bench.overhead_torch import PlainImages, measure_epoch
    from mixpipe.core.augment import RandomResizedCropFlip
    from mixpipe.core.source import UnmixedPlans
    from mixpipe.data import FileListDataset
    from mixpipe.data.subset import FirstN
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader

    s = ctx.sizes
    subset = FirstN(FileListDataset(ctx.data, "train"), s.host_images)
    crop = RandomResizedCropFlip()
    cells = s.image // s.stride
    fractions = (0.0, 0.5, 0.9)
    arms = ["plain"] + [f"mix {int(f * 100)}%" for f in fractions]
    runs: Dict[str, List[Dict[str, float]]] = {a: [] for a in arms}

    def run(arm: str, rep: int) -> Dict[str, float]:
        if arm == "plain":
            plain = PlainImages(subset, s.image, crop.scale, crop.ratio, rep)
            return measure_epoch(lambda: iter(DataLoader(plain, s.host_batch, shuffle=True,
                                                     num_workers=ctx.workers)), mixed=False)
        f = fractions[arms.index(arm) - 1]
        source = UnmixedPlans(len(subset)) if f == 0 else InProcessService(
            len(subset), {"policy": "random", "fraction": f, "layout": "halves",
                          "grid_cells": cells}, seed=rep)
        loader = MixedLoader(subset, source, s.host_batch, (s.image, s.image), s.stride,
                             num_workers=ctx.workers, seed=rep, constituent_transform=crop)
        loader.set_epoch(0)
        return measure_epoch(lambda: iter(loader), mixed=True)

    for rep in range(s.host_repeats):
        for arm in arms[rep % len(arms):] + arms[:rep % len(arms)]:  # no arm always first
            runs[arm].append(run(arm, rep))
    summary: Dict[str, Dict[str, Any]] = {}
    for arm, rs in runs.items():
        summary[arm] = {
            "cpu_s_per_source_image": statistics.median(r["cpu_s"] / r["source_images"]
                                                        for r in rs),
            "source_images_per_s": statistics.median(r["source_images"] / r["wall_s"]
                                                     for r in rs),
            "source_images_per_composite": statistics.median(
                r["source_images"] / r["composites"] for r in rs),
            "runs": rs}
    plain = summary["plain"]["cpu_s_per_source_image"]
    zero = summary["mix 0%"]["cpu_s_per_source_image"]
    for arm in arms[1:]:
        summary[arm]["cpu_per_image_vs_plain"] = summary[arm]["cpu_s_per_source_image"] / plain
        summary[arm]["cpu_per_image_vs_mix0"] = summary[arm]["cpu_s_per_source_image"] / zero
    ctx.loader_rate = summary["mix 0%"]["source_images_per_s"]
    ratios = {a: summary[a]["cpu_per_image_vs_plain"] for a in arms[1:]}
    met = all(r <= ctx.host_target for r in ratios.values())
    judged = not ctx.dry
    details = {"arms": summary, "fractions": list(fractions), "layout": "halves",
               "workers": ctx.workers, "source_images_per_run": len(subset),
               "batch": s.host_batch, "repeats": s.host_repeats,
               "plain_loader": "pillow decode + random resized crop (one pillow resize) + flip",
               "mixing_loader": "mixpipe.torch.MixedLoader + core RandomResizedCropFlip",
               "target": {"cpu_per_image_vs_plain_at_most": ctx.host_target, "met": met,
                          "judged": judged}}
    figure = ", ".join(f"{a.split()[1]} {r:.2f}x" for a, r in ratios.items())
    verdict = (f"target <= {ctx.host_target:g}x {'met' if met else 'MISSED'}" if judged else
               "target not judged at the dry run's size")
    return Check("host_cost", PASS if met or not judged else FAIL,
                 f"CPU-s per source image, mixing torch loader / plain torch loader: {figure} "
                 f"(plain {1e3 * plain:.2f} ms/image); {verdict}", details)


# ----------------------------------------------------------------------------------- training
class StepClock:
    """The arm's loader, passed to :func:`mixpipe.train.fit` as it is, timing every step.

    fit reports data wait per epoch; the check wants each step's share of it and how long the
    GPU was busy, without changing the loop users run. A step runs from the batch handed out to
    the next request; on CUDA an event pair around it gives the GPU time of its kernels (fit
    reads every step's loss back, so the queue drains within the step)."""

    def __init__(self, loader: Any, device: Any) -> None:
        self.loader = loader
        self.source = loader.source
        self.cuda = device.type == "cuda"
        self.waits: List[float] = []
        self.steps: List[float] = []
        self.events: List[Tuple[Any, Any]] = []

    def set_epoch(self, epoch: int) -> Any:
        return self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        self.loader.close()

    def __iter__(self) -> Iterator[Any]:
        import torch

        batches = iter(self.loader)
        handed: Optional[float] = None
        start = None
        while True:
            asked = time.perf_counter()
            if handed is not None:
                self.steps.append(asked - handed)
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self.events.append((start, end))
            try:
                batch = next(batches)
            except StopIteration:
                return
            handed = time.perf_counter()
            self.waits.append(handed - asked)
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            yield batch

    def busy_share(self) -> Optional[float]:
        """The device's busy time over the steps' wall time (waits included). On the CPU the
        step itself is the device's work."""
        total = sum(self.waits) + sum(self.steps)
        if not total:
            return None
        if not self.cuda:
            return sum(self.steps) / total
        import torch

        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1e3 / total

    def wait_shares(self) -> List[float]:
        return [w / (w + c) for w, c in zip(self.waits, self.steps) if w + c > 0]


class SmiSampler:
    """``nvidia-smi``'s utilisation.gpu every 200 ms while an arm trains, when the tool exists:
    the hardware's own figure beside the CUDA-event estimate."""

    def __init__(self, device: Any) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.samples: List[int] = []
        self.reason = ""
        self.scope = ""
        self.thread: Optional[threading.Thread] = None
        tool = shutil.which("nvidia-smi")
        if device.type != "cuda":
            self.reason = "not a CUDA run"
            return
        if tool is None:
            self.reason = "nvidia-smi not found"
            return
        cmd = [tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
               "-lms", "200"]
        self.scope, select = _smi_select(tool, device)
        cmd += select
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
        except OSError as err:
            self.reason = f"nvidia-smi did not start ({err})"
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append(int(line.strip().split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> Dict[str, Any]:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            if self.thread is not None:
                self.thread.join(timeout=5)
        if not self.samples:
            return {"available": False, "reason": self.reason or "nvidia-smi gave no samples"}
        return {"available": True, "samples": len(self.samples), "scope": self.scope,
                "mean_percent": statistics.fmean(self.samples),
                "median_percent": statistics.median(self.samples)}


def _smi_select(tool: str, device: Any) -> Tuple[str, List[str]]:
    """(what the samples cover, nvidia-smi's ``-i`` arguments): torch's GPU by its UUID when
    nvidia-smi lists it; the only GPU there is; else every GPU listed (said in the JSON)."""
    try:
        listed = subprocess.run([tool, "--query-gpu=uuid", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    if len(listed) == 1:
        return "the only GPU", []
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - a torch without .uuid: sample every GPU
        uuid = ""
    for name in listed:
        if uuid and name.endswith(uuid):
            return f"torch's GPU ({name})", ["-i", name]
    return f"every GPU nvidia-smi lists ({len(listed)})", []


def _bf16(device: Any) -> Tuple[bool, str]:
    import torch

    if device.type != "cuda":
        return False, "CPU run: bf16 autocast is for the GPU"
    if not torch.cuda.is_bf16_supported():
        return False, "this GPU has no bf16"
    return True, "CUDA bf16 autocast"


def _train_arm(ctx: Context, s: Any, arm: str, train: Any, eval_batches: Any,
               num_classes: int, bf16: bool) -> Dict[str, Any]:
    """One arm as ``mixpipe bench speedup`` trains it (its policy, batch, loader, fit), with the
    loader timed by :class:`StepClock` and fit run under bf16 autocast where chosen."""
    import numpy as np
    import torch

    from mixpipe.bench.speedup import make_loader
    from mixpipe.bench.speedup.arms import build_model
    from mixpipe.bench.speedup.settings import arm_batch_size, arm_policy
    from mixpipe.server import InProcessService
    from mixpipe.train import Normalize, Schedule, fit

    seed = s.seeds[0]
    n = len(train)
    torch.manual_seed(seed)
    model = build_model(s.model, num_classes)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                                momentum=s.momentum, nesterov=s.momentum > 0)
    service = InProcessService(n, arm_policy(arm, s, n, None, num_classes), seed=seed)
    labels = getattr(train, "labels", None)
    if labels is not None:
        service.set_labels(np.asarray(labels))
    batch = arm_batch_size(arm, s, n)
    clock = StepClock(make_loader(dataclasses.replace(s, batch_size=batch), train, service,
                                  seed), ctx.device)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    autocast = torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16)
    smi = SmiSampler(ctx.device)
    try:
        with autocast:
            history = fit(model, clock, optimizer, s.epochs, Schedule(s.schedule, s.warmup),
                          eval_loader=eval_batches, service=service, stride=s.stride,
                          device=ctx.device,
                          prepare=Normalize(channels_last=s.uses_channels_last()),
                          progress=False, desc=arm, loss_per=s.loss_per)
    finally:
        utilisation = smi.stop()
        clock.close()
    epochs = []
    for r in history["epochs"]:
        epochs.append({key: r.get(key) for key in (
            "epoch", "steps", "train_seconds", "data_wait_seconds", "compute_seconds",
            "forward_inputs", "constituents", "speedup_bound", "train_loss", "top1", "layouts")})
        epochs[-1]["images_per_s"] = r["constituents"] / r["train_seconds"]
        epochs[-1]["composites_per_s"] = r["forward_inputs"] / r["train_seconds"]
    seconds = sum(r["train_seconds"] for r in epochs)
    wait = sum(r["data_wait_seconds"] for r in epochs)
    shares = clock.wait_shares()
    return {"arm": arm, "batch_slots": batch, "epochs": epochs,
            "images_per_s": sum(r["constituents"] for r in epochs) / seconds,
            "composites_per_s": sum(r["forward_inputs"] for r in epochs) / seconds,
            "train_seconds": seconds, "data_wait_share": wait / seconds,
            "step_data_wait_share": _stats(shares),
            "device_busy_share": clock.busy_share(),
            "device_busy_source": "CUDA events around each step" if ctx.cuda else
            "host time of each step (CPU run)",
            "nvidia_smi": utilisation,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30
                                if ctx.cuda else None),
            "final_top1": history.get("final_top1"),
            "losses_finite": all(math.isfinite(r["train_loss"]) for r in epochs)}


#: training wall-clock per image the loader delivers, over the loader's own time: steps that
#: wait on the GPU, evaluation, the epoch's plan and reports
TRAIN_OVERHEAD = 1.5
#: seconds kept back after training, for the DALI and FFCV lines and the JSON
RESERVE_SECONDS = 20.0


def training_limit(ctx: Context, n: int, s: Any) -> Tuple[int, str]:
    """How many training images both arms can train on within the run's time budget.

    The torch loader's speed depends on the host (and on how many threads its BLAS starts in
    every worker), which this script cannot know in advance; host_cost measured it, so a slow
    host trains on fewer images instead of running past the machine's time limit."""
    left, rate = ctx.seconds_left(), ctx.loader_rate
    if left is None or not rate:
        return n, "no estimate (host_cost did not run, or no --budget-seconds)"
    per_image = len(s.policies) * s.epochs * TRAIN_OVERHEAD / rate
    fits = int((left - RESERVE_SECONDS) / per_image)
    text = (f"{left:.0f}s left of the budget, loader {rate:.0f} source images/s, "
            f"{len(s.policies)} arms x {s.epochs} epochs")
    if fits >= n:
        return n, f"all fit ({text})"
    return max(fits, 8 * s.batch_size), f"budget ({text})"


def check_training(ctx: Context) -> Check:
    import torch

    from mixpipe.bench.speedup import SpeedupSettings, load_data
    from mixpipe.train import EvalBatches

    z = ctx.sizes
    s = SpeedupSettings(data=ctx.data, loader="torch", model=z.model, epochs=z.epochs,
                        policies=("none", "mixtrain"), seeds=(0,), batch_size=z.batch,
                        workers=ctx.workers, threads=None, augment="crop", image_size=z.image,
                        stride=z.stride, device=str(ctx.device), progress=False)
    train, scored, num_classes = load_data(s, lambda *a: ctx.log("  data:", *a))
    limit, limit_why = training_limit(ctx, len(train), s)
    if limit < len(train):
        ctx.log(f"{PREFIX} training on the first {limit} of {len(train)} images: {limit_why}")
        s = dataclasses.replace(s, limit=limit)
        train, scored, num_classes = load_data(s, lambda *a: None)
    eval_batches = EvalBatches(scored, batch_size=256, size=s.image_size,
                               crop_ratio=s.crop_ratio)
    bf16, why = _bf16(ctx.device)
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    arms = {}
    for arm in s.policies:
        ctx.log(f"{PREFIX} arm {arm}: {s.model} at {s.image_size} px, {s.epochs} epochs "
                f"of {len(train)} images, {s.workers} loader workers, channels_last "
                f"{s.uses_channels_last()}, bf16 {bf16}")
        arms[arm] = _train_arm(ctx, s, arm, train, eval_batches, num_classes, bf16)
        a = arms[arm]
        ctx.log(f"{PREFIX} arm {arm} done: {a['images_per_s']:.0f} images/s, "
                f"{a['composites_per_s']:.0f} composites/s, data wait {_pct(a['data_wait_share'])}"
                f", device busy {_pct(a['device_busy_share'])}")
    none, mix = arms["none"], arms["mixtrain"]
    mixed = [(p, q) for p, q in zip(none["epochs"], mix["epochs"])
             if q["forward_inputs"] < q["constituents"]]
    per_epoch = [{"epoch": q["epoch"], "speedup": p["train_seconds"] / q["train_seconds"],
                  "bound": q["speedup_bound"],
                  "share_of_bound": p["train_seconds"] / q["train_seconds"] / q["speedup_bound"]}
                 for p, q in mixed]
    speedup = bound = share = None
    if mixed:
        speedup = sum(p["train_seconds"] for p, _ in mixed) / sum(q["train_seconds"]
                                                                  for _, q in mixed)
        bound = sum(q["constituents"] for _, q in mixed) / sum(q["forward_inputs"]
                                                               for _, q in mixed)
        share = speedup / bound
    ok = none["losses_finite"] and mix["losses_finite"] and bool(mixed)
    details = {"settings": dataclasses.asdict(s), "bf16_autocast": bf16, "bf16_why": why,
               "images_limit": {"images": len(train), "why": limit_why},
               "channels_last": s.uses_channels_last(), "num_train": len(train),
               "num_eval": len(scored), "arms": arms, "mixed_epochs": per_epoch,
               "speedup_over_mixed_epochs": speedup, "bound_over_mixed_epochs": bound,
               "share_of_bound": share,
               "note": "the mixed epochs of mixtrain against the same epochs of none; "
                       "share_of_bound = wall-clock speed-up / the plans' samples per forward "
                       "input"}
    smi = [arms[a]["nvidia_smi"].get("mean_percent") for a in ("none", "mixtrain")]
    smi_text = ("nvidia-smi " + "/".join(f"{x:.0f}%" for x in smi)) if all(
        x is not None for x in smi) else "nvidia-smi n/a"
    speed = (f"speed-up {speedup:.2f}x of bound {bound:.2f}x ({_pct(share)})" if mixed else
             "mixtrain never mixed")
    return Check("training", PASS if ok else FAIL,
                 f"{s.model} {s.image_size} px: none {none['images_per_s']:.0f} images/s, "
                 f"mixtrain {mix['images_per_s']:.0f} images/s in "
                 f"{mix['composites_per_s']:.0f} composites/s; {speed}; device busy "
                 f"{_pct(none['device_busy_share'])}/{_pct(mix['device_busy_share'])}, "
                 f"{smi_text}; step data wait median "
                 f"{_pct(none['step_data_wait_share'].get('median'))}/"
                 f"{_pct(mix['step_data_wait_share'].get('median'))} (none/mixtrain)"
                 f"{'' if ok else '; losses not finite or no mixing'}", details)


# ----------------------------------------------------------------------------------- DALI, FFCV
def _missing(module: str) -> str:
    try:
        __import__(module)
    except ImportError as err:
        return f"{module} does not import ({err})"
    return ""


def check_dali(ctx: Context) -> Check:
    """DALI's own GPU path: ``device="mixed"`` composites of a deterministic plan against the
    core composer on pillow decodes (decoders differ: a mean-level tolerance)."""
    missing = _missing("nvidia.dali")
    if missing:
        return Check("dali", SKIP, f"{missing}; DALI's mixed-device decode and composition "
                                   "are not checked on this machine")
    import numpy as np
    from nvidia.dali import pipeline_def

    from mixpipe import dali as mxd
    from mixpipe.core.compose import compose_slot
    from mixpipe.core.plan import Layout, MixPlan
    from mixpipe.data.writers import load_rgb

    s = ctx.sizes
    images = mxd.FileList.for_split(ctx.data, "train")
    ids = np.arange(8).reshape(4, 2)
    plan = MixPlan.from_slots([(r.tolist(), [0.5, 0.5], int(Layout.HALVES)) for r in ids],
                              num_samples=len(images))
    source = mxd.SlotSource(images, mxd.PlanBoard.temporary(), (s.image, s.image), s.stride,
                            max_constituents=2, view=mxd.FixedView())
    device_id, device = (0, "mixed") if ctx.cuda else (None, "cpu")

    @pipeline_def(enable_conditionals=True, batch_size=len(ids), num_threads=2,
                  device_id=device_id)
    def pipe():
        return mxd.mix(mxd.plan_inputs(source, parallel=False), device=device)

    p = pipe()
    p.build()
    source.board.publish(0, plan)
    out = p.run()[0]
    out = out.as_cpu() if hasattr(out, "as_cpu") else out
    worst = 0.0
    for row in range(len(ids)):
        got = np.array(out[row]).astype(np.float64)
        ref = compose_slot([load_rgb(images.path(int(i))) for i in ids[row]], [0.5, 0.5],
                           Layout.HALVES, (s.image, s.image), s.stride)
        worst = max(worst, float(np.abs(got - ref.astype(np.float64)).mean()))
    mxd.close_pipeline(p)
    tolerance = 4.0
    return Check("dali", PASS if worst <= tolerance else FAIL,
                 f"device={device} composites against compose_slot: worst slot mean "
                 f"{worst:.2f} levels (<= {tolerance:g}; nvJPEG and pillow decode differently)",
                 {"slots": len(ids), "mean_abs_diff_worst_slot": worst, "tolerance": tolerance,
                  "dali_device": device})


def check_ffcv(ctx: Context) -> Check:
    """FFCV's GPU part: its preset pipeline moves composites to the device and normalises them
    there (float16); checked against the same pipeline normalising on the CPU."""
    missing = _missing("ffcv")
    if missing:
        return Check("ffcv", SKIP, f"{missing}; FFCV's normalisation on the GPU is not checked "
                                   "on this machine")
    from mixpipe.ffcv.presets import FFCVSettings, val_loader, write_beton_from_tree

    s = ctx.sizes
    beton = write_beton_from_tree(ctx.data, "val", os.path.join(ctx.workdir, "val.beton"),
                                  max_side=2 * s.image, workers=max(1, ctx.workers))
    settings = FFCVSettings(size=(s.image, s.image), stride=s.stride)

    def first_batch(device: Any) -> Any:
        loader = val_loader(beton, settings, 16, num_workers=max(1, ctx.workers), device=device)
        loader.set_epoch(0)
        batch = next(iter(loader))
        images = batch.image.float().cpu()
        loader.close()
        return images

    cpu, dev = first_batch("cpu"), first_batch(ctx.device)
    worst = float((cpu - dev).abs().max())
    tolerance = 0.02
    return Check("ffcv", PASS if worst <= tolerance else FAIL,
                 f"preset val pipeline normalised on {ctx.device} against the CPU: max "
                 f"{worst:.4f} (<= {tolerance:g}, float16 on the device)",
                 {"max_abs_diff": worst, "tolerance": tolerance, "images": int(cpu.shape[0])})


CHECKS: Tuple[Tuple[str, Callable[[Context], Check]], ...] = (
    ("composites", check_composites), ("pooling_loss", check_pooling_loss),
    ("host_cost", check_host_cost), ("training", check_training), ("dali", check_dali),
    ("ffcv", check_ffcv))


# ----------------------------------------------------------------------------------- main
def _no_gpu_reason() -> str:
    """Why there is no usable GPU, or '' when there is one."""
    try:
        import torch
    except ImportError as err:
        return f"torch does not import ({err})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return ""


#: the variables numpy's BLAS (OpenBLAS, MKL) and OpenMP read, once, when they load
BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_threads(threads: Optional[int]) -> Dict[str, Any]:
    """Set the BLAS thread count when asked (it must precede numpy's first import: the torch
    loader's resizes are matrix products, and a BLAS that starts a thread per core in every
    loader worker multiplied its CPU-seconds per image several times over on a busy 2-core
    machine); return what the run had, for the JSON."""
    if threads is not None:
        for name in BLAS_VARIABLES:
            os.environ[name] = str(threads)
    return {"set_by_flag": threads, "numpy_loaded_before": "numpy" in sys.modules,
            **{name: os.environ.get(name) for name in BLAS_VARIABLES}}


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "gpu-check"),
                        help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every check on the CPU at a tiny size (tests this script)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="without CUDA exit 1 instead of 0")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes (default: CPU count - 2, at most 12; "
                             "1 in the dry run)")
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="generated training JPEGs per class (10 classes; default 400)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
    parser.add_argument("--model", default=None, help="training model (default tv:resnet18)")
    parser.add_argument("--host-target", type=float, default=HOST_TARGET,
                        help="host_cost passes when the mixing loader's CPU-s per source image "
                             "is at most this many times the plain loader's")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="the whole run's time budget: training uses fewer images when the "
                             "host's loader is too slow to fit it (default 270; dry run 50)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="set OPENBLAS/OMP/MKL_NUM_THREADS before numpy loads (default: "
                             "leave them as the environment has them, as users run)")
    parser.add_argument("--only", default=None,
                        help="comma-separated checks to run (default: all of "
                             f"{','.join(n for n, _ in CHECKS)})")
    parser.add_argument("--workdir", default=None,
                        help="where the generated data goes (default: a temporary folder)")
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = DRY if args.cpu_dry_run else GPU
    changes = {k: v for k, v in (("train_per_class", args.images_per_class),
                                 ("epochs", args.epochs), ("model", args.model)) if v is not None}
    return dataclasses.replace(sizes, **changes)


def run_checks(ctx: Context, names: Sequence[str], result: Dict[str, Any],
               write: Callable[[], None]) -> List[Check]:
    """Each check in turn; one that raises fails with its error and the others still run."""
    done = []
    for name, fn in CHECKS:
        if name not in names:
            continue
        started = time.perf_counter()
        ctx.log(f"{PREFIX} running {name}")
        try:
            check = fn(ctx)
        except Exception as err:  # noqa: BLE001 - a broken check is a failed check, not a crash
            ctx.log(traceback.format_exc().rstrip())
            check = Check(name, FAIL, f"raised {type(err).__name__}: {err}")
        check.seconds = time.perf_counter() - started
        done.append(check)
        result["checks"][name] = dataclasses.asdict(check)
        write()
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    blas = _blas_threads(args.blas_threads)
    reason = "" if args.cpu_dry_run else _no_gpu_reason()
    if reason:
        print(f"{PREFIX} no GPU ({reason}); nothing to check on this machine (--cpu-dry-run "
              "runs the same checks on the CPU at a tiny size)", flush=True)
        return 1 if args.require_gpu else 0
    import torch

    from mixpipe.bench.common import machine_info, write_json

    names = [n for n, _ in CHECKS] if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - {n for n, _ in CHECKS})
    if unknown:
        raise SystemExit(f"{PREFIX} unknown check(s) {unknown}; known: "
                         f"{[n for n, _ in CHECKS]}")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "gpu_check.json")
    log = Log(os.path.join(args.out, "gpu_check.log"))
    warnings.showwarning = lambda message, category, *rest, **kw: log(
        f"{PREFIX} warning: {category.__name__}: {message}")
    sizes = _sizes(args)
    dry = args.cpu_dry_run
    cpus = os.cpu_count() or 2
    workers = args.workers if args.workers is not None else (
        1 if dry else max(1, min(12, cpus - 2)))
    if dry:
        torch.set_num_threads(1)  # the dry run shares a small CPU with others
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    started = time.perf_counter()
    budget = args.budget_seconds if args.budget_seconds is not None else (50.0 if dry else 270.0)
    result: Dict[str, Any] = {
        "benchmark": "gpu_check", "cpu_dry_run": dry, "machine_info": machine_info(),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(
            sys.argv[1:] if argv is None else argv)),
        "device": torch.cuda.get_device_name(0) if not dry else "cpu",
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "sizes": dataclasses.asdict(sizes), "workers": workers, "blas": blas,
        "budget_seconds": budget, "checks": {}}

    def write() -> None:
        result["wall_seconds"] = time.perf_counter() - started
        write_json(json_path, result)

    log(f"{PREFIX} {'CPU dry run' if dry else result['device']}, torch {torch.__version__}, "
        f"{cpus} CPUs, {workers} loader workers; writing {json_path}")
    scratch = tempfile.TemporaryDirectory(prefix="mixpipe-gpu-check-", dir=args.workdir)
    try:
        data = prepare_data(log, scratch.name, sizes, workers)
        result["data_seconds"] = time.perf_counter() - started
        ctx = Context(sizes, dry, device, data, scratch.name, workers, log, args.host_target,
                      deadline=started + budget)
        checks = run_checks(ctx, names, result, write)
    finally:
        scratch.cleanup()
    failed = [c.name for c in checks if c.status == FAIL]
    result["passed"] = not failed
    result["failed"] = failed
    write()
    log(f"{PREFIX} summary ({result['wall_seconds']:.0f}s{', CPU dry run' if dry else ''}):")
    for check in checks:
        log(check.line())
    log(f"{PREFIX} {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; wrote {json_path}")
    log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
