"""Trainer side of mixpipe: region pooling, the mixed loss, loss feedback, and a compact loop.

Users with their own loop need three pieces::

    net = adapt(model)                                    # per-constituent logits
    logits = net(images, batch.layout, batch.weights)     # [B, K, classes]
    out = batch_loss(logits, batch)                       # scalar + per-constituent losses
    reporter.add(epoch, batch.ids, out.per_constituent, batch.loss_scale)

and ``reporter.end_epoch(epoch)`` after each epoch. :func:`fit` does all of it.
"""
from .adapt import RegionPooledModel, adapt, model_family
from .evaluate import EvalBatches, Normalize, evaluate
from .loop import fit
from .loss import MixedLoss, batch_loss, mixed_loss
from .metrics import TensorBoardMetrics, epoch_metrics
from .norms import recalibrate_norms
from .splitnorm import merge_norms, split_norms
from .models import SmallResNet, SmallResNetSettings, SmallViT, SmallViTSettings, build_model
from .pooling import RegionMasks, region_pool, token_region_pool
from .reporter import LossReporter, ReportError
from .schedule import BudgetSchedule, Schedule

__all__ = ["recalibrate_norms", "split_norms", "merge_norms", "adapt", "RegionPooledModel", "model_family", "mixed_loss", "batch_loss", "MixedLoss",
           "LossReporter", "ReportError", "fit", "Schedule", "BudgetSchedule", "evaluate", "EvalBatches",
           "Normalize", "RegionMasks", "region_pool", "token_region_pool", "SmallResNet",
           "SmallResNetSettings", "SmallViT", "SmallViTSettings", "build_model", "epoch_metrics",
           "TensorBoardMetrics"]
