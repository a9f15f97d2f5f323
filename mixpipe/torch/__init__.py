"""The plain-PyTorch adapter (reference loader)."""
from ..core.source import FixedPlans, PlanSource, fetch_plan
from .loader import MixedDataset, MixedLoader, PlanSampler, SlotRef, collate_mixed

__all__ = ["FixedPlans", "MixedDataset", "MixedLoader", "PlanSampler", "PlanSource", "SlotRef",
           "collate_mixed", "fetch_plan"]
