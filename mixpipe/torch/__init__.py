"""The plain-PyTorch adapter (reference loader)."""
from .loader import (FixedPlans, MixedDataset, MixedLoader, PlanSampler, PlanSource, SlotRef,
                     collate_mixed, fetch_plan)

__all__ = ["FixedPlans", "MixedDataset", "MixedLoader", "PlanSampler", "PlanSource", "SlotRef",
           "collate_mixed", "fetch_plan"]
