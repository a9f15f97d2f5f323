"""The functional core: plans, layouts, composition, the loss ledger and the policies.

numpy and torch only; nothing here imports a data loader.
"""
from .plan import Layout, MixPlan, PlanFormatError

__all__ = ["Layout", "MixPlan", "PlanFormatError"]
