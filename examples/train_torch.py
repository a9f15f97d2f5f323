"""Your own PyTorch training loop with MixTrain input mixing (plain torch DataLoader, no DALI/FFCV).

    mixpipe data prepare fashion-mnist --out data/fashion-mnist
    python examples/train_torch.py --data data/fashion-mnist --epochs 4 --batch-size 128

Any directory written by ``mixpipe data prepare`` works (``tree`` too). Epoch 0 trains every
image alone so the service learns each sample's loss; from epoch 1 the easy ones are composed
four to a 2x2 composite, which is where the forward passes are saved.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Union

import torch

from mixpipe.core.augment import RandomResizedCropFlip
from mixpipe.core.policies.mixtrain import MixTrainSettings, samples_per_slot
from mixpipe.data import ArrayDataset, FileListDataset, Prepared, find_prepared
from mixpipe.server import InProcessService
from mixpipe.torch import MixedLoader
from mixpipe.train import EvalBatches, LossReporter, Normalize, adapt, batch_loss, build_model, \
    evaluate

STRIDE = 8  # the small ResNets' total stride: region boundaries must fall on its grid


def open_split(prepared: Prepared, split: str) -> Union[ArrayDataset, FileListDataset]:
    """Arrays when prepared (no JPEG decoding per step), else the images of the file list."""
    kinds = prepared.splits.get(split, {})
    return (ArrayDataset if "arrays" in kinds else FileListDataset)(prepared.root, split)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory written by `mixpipe data prepare`")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128, help="samples per optimiser step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--eval-split", default=None, help="held-out split (default: val, else test)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    prepared = find_prepared(args.data, ("train", "val", "test"))
    held_out = args.eval_split or ("val" if "val" in prepared.splits else "test")
    train, size = open_split(prepared, "train"), (args.image_size, args.image_size)
    settings = MixTrainSettings(epochs=args.epochs, grid_cells=args.image_size // STRIDE)
    service = InProcessService(len(train), settings, seed=args.seed)
    # a slot may carry four samples: fewer slots per batch keep the samples per step
    slots = max(1, round(args.batch_size / samples_per_slot(settings, args.epochs, len(train))))
    loader = MixedLoader(train, service, slots, size, stride=STRIDE, num_workers=args.workers,
                         seed=args.seed, constituent_transform=RandomResizedCropFlip())
    held = EvalBatches(open_split(prepared, held_out), batch_size=256, size=size, crop_ratio=1.0)
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
        composites = int((plan.counts > 1).sum())
        print(f"epoch {epoch + 1}/{args.epochs}: {plan.num_forward_inputs} forward inputs, "
              f"{composites} composites holding {int(plan.counts[plan.counts > 1].sum())} "
              f"samples; {held_out} top-1 {evaluate(net, held, prepare, args.device):.4f}",
              flush=True)
    reporter.close()
    print(f"service: losses of {service.stats()['seen']} of {len(train)} samples reported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
