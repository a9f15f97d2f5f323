"""Where a mixing arm spends its passes, and what the trained model makes of each sample.

One (arm, seed) run of the speed-up benchmark, watched: every epoch's plan says which samples
sat in composites, and after the last epoch the model scores every training image on its own
(full resolution, no augmentation). Samples are grouped by how many epochs they spent single,
and each group gets its single-view top-1 and loss. This answers what a top-1 figure cannot:
whether the samples mixtrain keeps in composites are still learned as single images, and how well
the samples it always keeps single are fitted.

It also records the figures that test why a policy helps or hurts (:mod:`.diagnose`): each
class's mixed share per epoch, how often a mixed sample stays mixed, the loss a constituent
reports against its single-view loss, and the eval split scored class by class. Every other flag
is the speed-up benchmark's (``--data``, ``--fraction``, ``--per-class`` ...).

``--groups-from`` groups another arm's run (``none``, say) by the epochs-single counts a
mixtrain run saved with ``--save-arrays``, so the two models are compared on the same samples.

``python -m mixpipe.bench.speedup.history --arm mixtrain --epochs 20 --seed 0 --loader ffcv
--save-arrays A.npz --out H.json``
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .settings import SpeedupSettings

__all__ = ["watch_run", "group_summary", "main", "GROUPS"]

#: (name, rule on the epochs a sample spent single out of E): the bands the summary reports
GROUPS = (
    ("single_only_in_warmup", lambda c, e: c <= 1),
    ("single_2_to_half", lambda c, e: (c >= 2) & (c <= e // 2)),
    ("single_over_half", lambda c, e: (c > e // 2) & (c < e)),
    ("always_single", lambda c, e: c == e),
)


def group_summary(single_epochs: np.ndarray, epochs: int, loss: np.ndarray,
                  correct: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Per band of epochs-single: size, single-view top-1, median and mean loss."""
    out = {}
    for name, rule in GROUPS:
        m = rule(single_epochs, epochs)
        n = int(np.count_nonzero(m))
        out[name] = {"n": n,
                     "top1": float(correct[m].mean()) if n else None,
                     "median_loss": float(np.median(loss[m])) if n else None,
                     "mean_loss": float(loss[m].mean()) if n else None}
    return out


class _Watch:
    """Keeps the first plan of every epoch, every reported loss, and the model being trained."""

    def __init__(self) -> None:
        self.single: Dict[int, np.ndarray] = {}
        self.reported: Dict[int, np.ndarray] = {}
        self.model: Any = None
        self.num_samples = 0

    def __call__(self, service: Any, model: Any) -> Any:
        self.model = model
        inner = service.plan
        inner_report = service.report

        def report(epoch: int, ids: Any, losses: Any, *args: Any, **kwargs: Any) -> Any:
            if epoch not in self.reported:
                self.reported[epoch] = np.full(self.num_samples, np.nan, np.float32)
            self.reported[epoch][np.asarray(ids, np.int64)] = np.asarray(losses, np.float32)
            return inner_report(epoch, ids, losses, *args, **kwargs)

        def plan(epoch: int, rank: int = 0, world_size: int = 1) -> Any:
            p = inner(epoch, rank, world_size)
            self.num_samples = p.num_samples
            if epoch not in self.single:
                single = np.zeros(p.num_samples, bool)
                single[p.ids[p.counts == 1, 0]] = True
                self.single[epoch] = single
            return p

        service.plan = plan
        service.report = report
        return service


def single_view(model: Any, dataset: Any, s: SpeedupSettings) -> tuple:
    """(loss float32[N], correct bool[N], predicted int64[N], labels int64[N]) of every image
    of ``dataset`` on its own."""
    import torch

    from mixpipe.train import EvalBatches, Normalize

    prepare = Normalize(channels_last=s.uses_channels_last())
    was_training = model.training
    model.eval()
    losses: List[np.ndarray] = []
    predicted: List[np.ndarray] = []
    truth: List[np.ndarray] = []
    with torch.no_grad():
        for images, labels in EvalBatches(dataset, batch_size=512, size=s.image_size,
                                          crop_ratio=s.crop_ratio):
            logits = model(prepare(images, s.device))
            labels = labels.to(logits.device)
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                          .cpu().numpy())
            predicted.append(logits.argmax(1).cpu().numpy())
            truth.append(labels.cpu().numpy())
    model.train(was_training)
    pred, lab = np.concatenate(predicted), np.concatenate(truth)
    return np.concatenate(losses), pred == lab, pred.astype(np.int64), lab.astype(np.int64)


def watch_run(s: SpeedupSettings, arm: str, seed: int,
              groups_from: Optional[np.ndarray] = None) -> tuple:
    """(summary dict, per-sample arrays dict, the trained model) of one watched run."""
    import torch

    from mixpipe.train import EvalBatches

    from .arms import train_arm
    from .data import load_data

    if s.threads:
        torch.set_num_threads(s.threads)
    train, scored, num_classes = load_data(s)
    eval_batches = EvalBatches(scored, batch_size=512, size=s.image_size,
                               crop_ratio=s.crop_ratio)
    watch = _Watch()
    history = train_arm(s, arm, seed, train, eval_batches, num_classes, observe=watch)
    epochs = sorted(watch.single)
    single_epochs = np.sum([watch.single[e] for e in epochs], axis=0).astype(np.int64)
    loss, correct, _, labels = single_view(watch.model, train, s)
    _, eval_correct, eval_pred, eval_labels = single_view(watch.model, scored, s)
    grouping = single_epochs if groups_from is None else groups_from
    if grouping.shape != single_epochs.shape:
        raise SystemExit(f"--groups-from holds {grouping.size} samples, the training set "
                         f"{single_epochs.size}: save them from a run on the same data")
    summary = {
        "arm": arm, "seed": seed, "final_top1": history["final_top1"],
        "epochs": len(epochs),
        "grouped_by": "this run" if groups_from is None else "--groups-from",
        "single_share_per_epoch": [float(watch.single[e].mean()) for e in epochs],
        "epochs_single_histogram": np.bincount(single_epochs,
                                               minlength=len(epochs) + 1).tolist(),
        "groups": group_summary(grouping, len(epochs), loss, correct),
        "train_top1_single_view": float(correct.mean()),
        **diagnosis(watch, epochs, labels, loss, correct, num_classes, eval_correct, eval_pred,
                    eval_labels),
    }
    arrays = {"single_epochs": single_epochs, "loss": loss, "correct": correct}
    return summary, arrays, watch.model


def diagnosis(watch: _Watch, epochs: List[int], labels: np.ndarray, loss: np.ndarray,
              correct: np.ndarray, num_classes: int, eval_correct: np.ndarray, eval_pred: np.ndarray,
              eval_labels: np.ndarray) -> Dict[str, Any]:
    """The hypotheses' figures (:mod:`.diagnose`) of one watched run."""
    from .diagnose import (class_mixed_share, per_class_top1, prediction_share, stickiness,
                           view_gap)

    mixed = {e: ~watch.single[e] for e in epochs}
    # the last epoch that mixed anything: its reports are the ones a policy ranked next
    mixed_epochs = [e for e in epochs if mixed[e].any()]
    gap_epoch = mixed_epochs[-1] if mixed_epochs else epochs[-1]
    reported = watch.reported.get(gap_epoch)
    return {
        "class_mixed_share_per_epoch": [class_mixed_share(mixed[e], labels, num_classes)
                                        for e in epochs],
        "stickiness_per_epoch": [stickiness(mixed[a], mixed[b])
                                 for a, b in zip(epochs, epochs[1:])],
        "view_gap_epoch": gap_epoch,
        "view_gap": (view_gap(reported, loss, mixed[gap_epoch]) if reported is not None
                     else None),
        "train_top1_per_class": per_class_top1(correct, labels, num_classes),
        "eval_top1_per_class": per_class_top1(eval_correct, eval_labels, num_classes),
        "eval_prediction_share": prediction_share(eval_pred, num_classes),
        "eval_top1": float(np.mean(eval_correct)),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mixpipe.bench.common import machine_info, write_json

    import dataclasses

    from mixpipe.bench.flags import add_flags, settings_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="mixtrain", help="the arm to watch (default mixtrain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups-from", help="an .npz a mixtrain run saved: group by its "
                                              "epochs-single counts")
    parser.add_argument("--save-arrays", help="write the per-sample arrays (.npz) here")
    parser.add_argument("--out", required=True, help="JSON path")
    # every other setting is the speed-up benchmark's flag of the same name
    add_flags(parser, SpeedupSettings, exclude=("policies", "seeds", "frontier",
                                                "frontier_seeds", "server"))
    args = parser.parse_args(argv)
    base = SpeedupSettings(loader="ffcv", epochs=20, progress=False)
    try:
        s = dataclasses.replace(settings_from_args(args, SpeedupSettings, base),
                                seeds=(args.seed,), policies=(args.arm,))
    except ValueError as err:
        raise SystemExit(f"history: {err}") from None
    groups = None
    if args.groups_from:
        groups = np.load(args.groups_from)["single_epochs"]
    summary, arrays, _ = watch_run(s, args.arm, args.seed, groups)
    if args.save_arrays:
        np.savez_compressed(args.save_arrays, **arrays)
    command = "python -m mixpipe.bench.speedup.history " + " ".join(
        sys.argv[1:] if argv is None else argv)
    write_json(args.out, {"command": command, "machine": machine_info(),
                          "settings": dataclasses.asdict(s),
                          "summary": summary})
    print(f"wrote {args.out}: single-view train top-1 by epochs single: " + ", ".join(
        f"{k} {v['n']} {v['top1']:.4f}" for k, v in summary["groups"].items() if v["n"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
