"""Thin nn.Modules over the ops (the math stays in mokernels.ops): drop-ins for nn.Linear."""
from .multi_lora import MultiLoRALinear

__all__ = ["MultiLoRALinear"]
