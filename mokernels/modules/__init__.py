"""Thin nn.Modules over the ops (the math stays in mokernels.ops): drop-ins for nn.Linear."""
from .multi_lora import MultiLoRALinear
from .householder import HouseholderChain, RankOneExperts

__all__ = ["MultiLoRALinear", "HouseholderChain", "RankOneExperts"]
