"""Bit-width assignment of quantized messages (trainer callbacks)."""
from pyg_adaqp.assign.adaptive import AdaptiveBits
from pyg_adaqp.assign.cost_model import CostModel, assignment_seconds, profile_cost_model
from pyg_adaqp.assign.milp import KeyProblem, Solution, group_messages, objective, solve_key
from pyg_adaqp.assign.schemes import RandomBits, UniformBits
from pyg_adaqp.assign.tracer import RangeTracer

__all__ = [
    "AdaptiveBits",
    "CostModel",
    "KeyProblem",
    "RandomBits",
    "RangeTracer",
    "Solution",
    "UniformBits",
    "assignment_seconds",
    "group_messages",
    "objective",
    "profile_cost_model",
    "solve_key",
]
