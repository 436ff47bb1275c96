"""Fused elementwise kernels the models call. `kernels.reference` holds the pure-torch
semantics; the Triton versions (`kernels.batchnorm_silu`, `kernels.mish`) sit behind the
same names as registered `torch.library` custom ops.

Backend per call (`backend=` argument) or by default (`set_backend`, `use_backend`):
"auto" = Triton on CUDA tensors, elsewhere the reference (the mish sums: their one-exp eager
form, `kernels.mish.mish_sum`); "triton" = always Triton (on CPU
tensors only under TRITON_INTERPRET=1); "torch" = the reference. Importing this package
does not import Triton (see `kernels._common`).
"""
from kernels._common import BACKENDS, get_backend, set_backend, use_backend
from kernels.batchnorm_silu import BatchNormSiLU2d, bn_silu
from kernels.mish import dense_residual_mish, residual_mish

__all__ = ["bn_silu", "residual_mish", "dense_residual_mish", "BatchNormSiLU2d",
           "BACKENDS", "get_backend", "set_backend", "use_backend"]
