"""Whole-model budgets: candidate curves, what they cost, how the budget is allocated.

``candidates`` (each layer's error-versus-cost points) -> ``costs`` (MACs, params,
measured latency via ``latency``) -> ``knapsack`` (the allocation) -> ``plan``
(refinement, sensitivity weighting from ``sensitivity``, the latency correction).
"""

from .candidates import Candidate
from .costs import CostModel, make_costs
from .plan import Allocation, Planning, plan_budget

__all__ = ["Allocation", "Candidate", "CostModel", "Planning", "make_costs", "plan_budget"]
