"""``make gpu-check``: prove (or break) the GPU paths on the first machine that has CUDA.

The GPU code paths (DALI ``device="mixed"`` decoding and composition, CUDA training) have never
run on the CPU-only machines this project is developed on. On a generated 224 px tree of
varied-size JPEGs this script, in a few minutes:

1. runs the mixing DALI pipeline with ``device="mixed"`` (50 % mixed in halves) and the plain
   DALI pipeline (``fn.readers.file`` + ``decoders.image_random_crop`` + ``resize`` + ``flip``)
   and records composites/s and host CPU-seconds per source image of both;
2. checks the GPU composites against the core composer (:func:`mixpipe.core.compose.compose_slot`
   on pillow-decoded images) with a deterministic view;
3. runs a few CUDA training steps on the mixed batches.

It writes ``benchmarks/results/gpu_check.json`` and exits non-zero if a check fails. Without
CUDA it prints one "no GPU" line and exits 0 at once, so CPU-only CI is unaffected.
``--cpu-dry-run`` runs the same steps on CPU-only DALI and CPU torch at a small size (to test
this script itself; its figures say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _no_gpu_reason() -> str:
    """Why there is no usable GPU, or '' when there is one (cheap: no DALI import)."""
    try:
        import torch
    except ImportError as err:
        return f"torch does not import ({err})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return ""


def _tree(workdir: str, size: int, images: int) -> str:
    from mixpipe.data import prepare_tree
    from mixpipe.data.synthetic import TreeSpec, make_tree

    classes = 8
    tree = make_tree(os.path.join(workdir, "src"),
                     TreeSpec(classes=classes, train_per_class=max(2, images // classes),
                              val_per_class=1, sides=(max(size, 256) if size >= 224 else size,
                                                      max(size, 500) if size >= 224 else 2 * size),
                              seed=0))
    out = os.path.join(workdir, "prepared")
    prepare_tree(tree.root, out, workers=1, log=lambda _: None)
    return out


def _throughput(data: str, settings, device_id, batch_size: int, batches: int) -> Dict[str, Any]:
    """Mixed (50 % halves) against plain DALI: composites/s and CPU-seconds per source image."""
    from types import SimpleNamespace

    from mixpipe.bench.overhead_dali import _measure_mixed, _measure_plain, _plans_for

    args = SimpleNamespace(device_id=device_id, threads=2, workers=0)  # as dali_imagenet
    n = sum(1 for _ in open(os.path.join(data, "train_files.txt")))
    plans = _plans_for(0.5, n, "halves", settings.size[1] // settings.stride, 0)
    mixed = _measure_mixed(data, settings, plans, batch_size, batches, 2, args)
    plain = _measure_plain(data, settings, batch_size, batches, 2, args)
    per = {name: r["cpu_s"] / max(1, r["source_images"]) for name, r in
           (("mixed", mixed), ("plain", plain))}
    return {"mixed": mixed, "plain": plain,
            "composites_per_s": mixed["composites"] / mixed["wall_s"],
            "plain_images_per_s": plain["composites"] / plain["wall_s"],
            "cpu_s_per_source_image": per,
            "cpu_ratio_mixed_vs_plain": per["mixed"] / per["plain"]}


def _reference_check(data: str, size: int, stride: int, device_id, tolerance: float):
    """GPU composites of a deterministic plan against the core composer on pillow decodes."""
    import numpy as np
    from nvidia.dali import pipeline_def

    from mixpipe import dali as mxd
    from mixpipe.core.compose import compose_slot
    from mixpipe.core.plan import Layout, MixPlan
    from mixpipe.data.writers import load_rgb

    images = mxd.FileList.for_split(data, "train")
    n = 8
    ids = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int64)
    plan = MixPlan.from_slots([(list(map(int, r)), [0.5, 0.5], int(Layout.HALVES)) for r in ids],
                              num_samples=len(images))
    source = mxd.SlotSource(images, mxd.PlanBoard.temporary(), (size, size), stride,
                            max_constituents=2, view=mxd.FixedView())
    device = "cpu" if device_id is None else "mixed"

    @pipeline_def(enable_conditionals=True, batch_size=4, num_threads=2, device_id=device_id)
    def pipe():
        inputs = mxd.plan_inputs(source, parallel=False)
        return mxd.mix(inputs, device=device)

    p = pipe()
    p.build()
    source.board.publish(0, plan)
    out = p.run()[0]
    out = out.as_cpu() if hasattr(out, "as_cpu") else out
    worst = 0.0
    for row in range(len(ids)):
        got = np.array(out[row]).astype(np.float64)
        consts = [load_rgb(images.path(int(i))) for i in ids[row]]
        ref = compose_slot(consts, [0.5, 0.5], Layout.HALVES, (size, size), stride)
        worst = max(worst, float(np.abs(got - ref.astype(np.float64)).mean()))
    mxd.close_pipeline(p)
    return {"slots": len(ids), "constituents": n, "mean_abs_diff_worst_slot": worst,
            "tolerance": tolerance, "met": worst <= tolerance}


def _train_steps(data: str, settings, device_id, steps: int, device: str) -> Dict[str, Any]:
    import torch

    from mixpipe.dali.pipeline import make_train_loader
    from mixpipe.train import Normalize, build_model
    from mixpipe.train.adapt import adapt
    from mixpipe.train.evaluate import channels_last_runs
    from mixpipe.train.loss import batch_loss

    loader = make_train_loader(data, settings, 8, None, device_id, 2, 2,
                               "fork" if device_id is None else "spawn")
    prepare = Normalize(channels_last=channels_last_runs(device, settings.size[0]))
    model = adapt(build_model("resnet-small", 8), stride=settings.stride).to(device)
    if prepare.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    start = time.perf_counter()
    with loader:
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            batch = batch.to(device)
            logits = model(prepare(batch.image, device), batch.layout, batch.weights)
            loss = batch_loss(logits, batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {"steps": len(losses), "losses": losses, "seconds": time.perf_counter() - start,
            "finite": all(l == l and abs(l) < 1e6 for l in losses),
            "channels_last": prepare.channels_last}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "gpu_check.json"))
    parser.add_argument("--images", type=int, default=256, help="images in the generated tree")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    parser.add_argument("--steps", type=int, default=5, help="CUDA training steps")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every step on CPU-only DALI and torch, small (tests this script)")
    args = parser.parse_args(argv)

    reason = "" if args.cpu_dry_run else _no_gpu_reason()
    if reason:
        print(f"gpu-check: no GPU ({reason}); nothing to check on this machine")
        return 0
    from mixpipe.bench.common import machine_info, write_json
    from mixpipe.dali.pipeline import PipelineSettings

    dry = args.cpu_dry_run
    size, stride = (64, 16) if dry else (224, 32)
    settings = PipelineSettings(size=(size, size), stride=stride)
    device_id, device = (None, "cpu") if dry else (0, "cuda")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixpipe-gpu-check-") as workdir:
        data = _tree(workdir, size, min(args.images, 32) if dry else args.images)
        result: Dict[str, Any] = {
            "benchmark": "gpu_check", "machine_info": machine_info(), "cpu_dry_run": dry,
            "settings": {"size": size, "stride": stride, "images": args.images,
                         "batches": args.batches, "steps": args.steps, "mixed_fraction": 0.5,
                         "layout": "halves"}}
        result["throughput"] = _throughput(data, settings, device_id, 8 if dry else 64,
                                           min(args.batches, 3) if dry else args.batches)
        result["reference"] = _reference_check(data, size, stride, device_id, tolerance=4.0)
        result["training"] = _train_steps(data, settings, device_id,
                                          min(args.steps, 2) if dry else args.steps, device)
    result["wall_seconds"] = time.perf_counter() - started
    ok = result["reference"]["met"] and result["training"]["finite"]
    result["passed"] = ok
    write_json(args.out, result)
    t = result["throughput"]
    print(f"gpu-check: {t['composites_per_s']:.1f} composites/s, CPU s per source image "
          f"{t['cpu_ratio_mixed_vs_plain']:.2f}x the plain DALI pipeline, composite vs reference "
          f"{result['reference']['mean_abs_diff_worst_slot']:.2f} (<= "
          f"{result['reference']['tolerance']}), {result['training']['steps']} training steps; "
          f"{'passed' if ok else 'FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
