"""Fused elementwise kernels the models call. `kernels.reference` holds the pure-torch
semantics; Triton versions (issue: fused Triton kernels) plug in behind the same names."""
from kernels.reference import bn_silu, dense_residual_mish, residual_mish

__all__ = ["bn_silu", "residual_mish", "dense_residual_mish"]
