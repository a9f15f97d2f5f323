"""The plain-PyTorch adapter (reference loader)."""
from ..core.source import FixedPlans, PlanSource, fetch_plan
from .loader import MixedDataset, MixedLoader, PlanSampler, SlotRef, collate_mixed
from .threads import WorkerInit, blas_threads, limit_blas_threads

__all__ = ["FixedPlans", "MixedDataset", "MixedLoader", "PlanSampler", "PlanSource", "SlotRef",
           "WorkerInit", "blas_threads", "collate_mixed", "fetch_plan", "limit_blas_threads"]
