"""Bit-width assignment of quantized messages (trainer callbacks)."""
from pyg_adaqp.assign.schemes import RandomBits, UniformBits

__all__ = ["RandomBits", "UniformBits"]
