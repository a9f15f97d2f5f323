"""Your own PyTorch training loop fed by FFCV, whose compiled decoder composes the mixed inputs.

    mixpipe data prepare fashion-mnist --out data/fashion-mnist        # writes the .beton files
    python examples/train_ffcv.py --data data/fashion-mnist --epochs 4 --batch-size 128

A ``mixpipe data prepare tree`` directory needs ``--beton``. The loader is FFCV's own with a
plan-aware decoder in front: it reads each slot's constituents from the .beton and crops each
into its region; epoch 0 trains every image alone, later epochs mix what the service finds easy.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch
from ffcv.transforms import ToTensor, ToTorchImage

from mixpipe.core.policies.mixtrain import MixTrainSettings, samples_per_slot
from mixpipe.core.source import UnmixedPlans
from mixpipe.data import find_prepared
from mixpipe.ffcv import CenterCropMixDecoder, MixLabelDecoder, MixLoader, \
    RandomResizedCropMixDecoder
from mixpipe.server import InProcessService
from mixpipe.train import LossReporter, Normalize, adapt, batch_loss, build_model, evaluate

STRIDE = 8  # the small ResNets' total stride: region boundaries must fall on its grid


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory written by `mixpipe data prepare`")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128, help="samples per optimiser step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--eval-split", default=None, help="held-out split (default: val, else test)")
    p.add_argument("--workers", type=int, default=2, help="FFCV decoding threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    prepared = find_prepared(args.data, ("train", "val", "test"))
    held_out = args.eval_split or ("val" if "val" in prepared.splits else "test")
    size, n = (args.image_size, args.image_size), prepared.samples["train"]
    settings = MixTrainSettings(epochs=args.epochs, grid_cells=args.image_size // STRIDE)
    service = InProcessService(n, settings, seed=args.seed)
    # a slot may carry four samples: fewer slots per batch keep the samples per step
    slots = max(1, round(args.batch_size / samples_per_slot(settings, args.epochs, n)))
    # mixpipe's decoders replace FFCV's: the image one composes a slot, the label one packs the
    # slot's targets, weights, ids and layout into one row; the rest is FFCV's usual (uint8 NCHW)
    loader = MixLoader(prepared.path("train", "beton"), slots, service, num_workers=args.workers,
                       pipelines={"image": [RandomResizedCropMixDecoder(size, (0.35, 1.0),
                                                                        stride=STRIDE,
                                                                        flip_prob=0.5),
                                            ToTensor(), ToTorchImage()],
                                  "label": [MixLabelDecoder(), ToTensor()]})
    beton = prepared.path(held_out, "beton")  # held-out images: every one alone, whole
    held = MixLoader(beton, 256, UnmixedPlans(prepared.samples[held_out]), max_constituents=1,
                     num_workers=args.workers,
                     pipelines={"image": [CenterCropMixDecoder(size, ratio=1.0, stride=STRIDE),
                                          ToTensor(), ToTorchImage()],
                                "label": [MixLabelDecoder(), ToTensor()]})
    net = adapt(build_model("resnet-tiny", len(prepared.classes)), stride=STRIDE).to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    prepare, reporter = Normalize(), LossReporter(service)
    for epoch in range(args.epochs):
        plan = loader.set_epoch(epoch)  # asks the service which samples to mix this epoch
        net.train()
        for batch in loader:
            logits = net(prepare(batch.image, args.device), batch.layout,
                         batch.weights.to(args.device))  # [slots, K, classes]: one per constituent
            out = batch_loss(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            reporter.add(epoch, batch.ids, out.per_constituent, batch.loss_scale)
        reporter.end_epoch(epoch)  # deliver the losses and commit: the next plan reads them
        scheduler.step()
        mixed = plan.counts > 1
        print(f"epoch {epoch + 1}/{args.epochs}: {plan.num_forward_inputs} forward inputs, "
              f"{int(mixed.sum())} composites holding {int(plan.counts[mixed].sum())} samples; "
              f"{held_out} top-1 {evaluate(net, held, prepare, args.device):.4f}", flush=True)
    reporter.close()
    print(f"service: losses of {service.stats()['seen']} of {n} samples reported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
