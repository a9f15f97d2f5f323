"""Your own PyTorch training loop fed by an NVIDIA DALI pipeline that composes the mixed inputs.

    mixpipe data prepare fashion-mnist --out data/fashion-mnist
    python examples/train_dali.py --data data/fashion-mnist --epochs 4 --batch-size 128
    python examples/train_dali.py --data data/fashion-mnist --device cpu   # CPU-only DALI

Any directory written by ``mixpipe data prepare`` works (``tree`` too). DALI decodes each
constituent straight into its region of the composite (on the GPU with ``--device cuda``);
epoch 0 trains every image alone, later epochs mix the samples the service finds easy.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch
from nvidia.dali import fn, pipeline_def, types

from mixpipe import dali as mxd
from mixpipe.core.policies.mixtrain import MixTrainSettings, samples_per_slot
from mixpipe.data import find_prepared
from mixpipe.server import InProcessService
from mixpipe.train import LossReporter, Normalize, adapt, batch_loss, build_model, evaluate

STRIDE = 8  # the small ResNets' total stride: region boundaries must fall on its grid


@pipeline_def(enable_conditionals=True)  # mix() branches on each slot's layout
def mixing_pipeline(source: mxd.SlotSource, parallel: bool, device: str) -> tuple:
    inputs = mxd.plan_inputs(source, parallel=parallel)  # the slots of the service's plan
    images = mxd.mix(inputs, device=device)  # decode + crop each constituent into its region
    # 0..255 -> 0..1 only, so Normalize below treats these and the uint8 held-out images alike;
    # no mirror= here: a mirrored composite would swap its regions against their labels
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[0.0] * 3, std=[255.0] * 3)
    return images, inputs.targets, inputs.weights, inputs.ids, inputs.layout, inputs.loss_scale


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory written by `mixpipe data prepare`")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128, help="samples per optimiser step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--eval-split", default=None, help="held-out split (default: val, else test)")
    p.add_argument("--workers", type=int, default=2, help="plan-source processes (0: inline)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    prepared = find_prepared(args.data, ("train", "val", "test"))
    held_out = args.eval_split or ("val" if "val" in prepared.splits else "test")
    size, gpu = (args.image_size, args.image_size), args.device.startswith("cuda")
    device_id = (torch.device(args.device).index or 0) if gpu else None  # None: CPU-only DALI
    images = mxd.FileList.for_split(args.data, "train")  # line i of train_files.txt is sample i
    source = mxd.SlotSource(images, mxd.PlanBoard.temporary(), size, stride=STRIDE, seed=args.seed)
    settings = MixTrainSettings(epochs=args.epochs, grid_cells=args.image_size // STRIDE)
    service = InProcessService(len(images), settings, seed=args.seed)
    # a slot may carry four samples: fewer slots per batch keep the samples per step
    slots = max(1, round(args.batch_size / samples_per_slot(settings, args.epochs, len(images))))
    pipe = mixing_pipeline(source, args.workers > 0, "mixed" if gpu else "cpu", batch_size=slots,
                           num_threads=2, device_id=device_id, py_num_workers=max(1, args.workers),
                           py_start_method="spawn", seed=args.seed)
    held = mxd.ValBatches.for_split(args.data, held_out, size, ratio=1.0, device_id=device_id)
    net = adapt(build_model("resnet-tiny", len(prepared.classes)), stride=STRIDE).to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    prepare, reporter = Normalize(), LossReporter(service)
    with mxd.MixIterator(pipe, source, service, seed=args.seed) as loader:
        for epoch in range(args.epochs):
            plan = loader.set_epoch(epoch)  # asks the service which samples to mix this epoch
            net.train()
            for batch in loader:  # run every epoch to its end: DALI cannot stop part-way
                logits = net(prepare(batch.image, args.device), batch.layout,
                             batch.weights.to(args.device))  # [slots, K, classes]
                out = batch_loss(logits, batch)  # one loss per constituent
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                reporter.add(epoch, batch.ids, out.per_constituent, batch.loss_scale)
            reporter.end_epoch(epoch)  # deliver the losses and commit: the next plan reads them
            scheduler.step()
            mixed = plan.counts > 1
            print(f"epoch {epoch + 1}/{args.epochs}: {plan.num_forward_inputs} forward inputs, "
                  f"{int(mixed.sum())} composites holding {int(plan.counts[mixed].sum())} "
                  f"samples; {held_out} top-1 {evaluate(net, held, prepare, args.device):.4f}",
                  flush=True)
    reporter.close()
    print(f"service: losses of {service.stats()['seen']} of {len(images)} samples reported")
    return 0


if __name__ == "__main__":  # "spawn" workers re-import this file: build nothing above
    raise SystemExit(main())
