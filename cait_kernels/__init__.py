"""cait_kernels: the ops of cait (pruned-head attention, the ATME merge step, unmerge).

Each public op dispatches by device (see :mod:`cait_kernels.dispatch`); ``NAME_reference`` is the
PyTorch definition of its math and ``NAME_triton`` its fused Triton kernel(s); ``atme_step_cpu`` is the
ATME step as one C++ kernel for CPU tensors. This package knows tensors, not models.
"""

from .atme import atme_step_reference, block_count
from .attention import pruned_attention_reference
from .cpu_atme import atme_step_cpu
from .dispatch import atme_step, backend, pruned_attention, unmerge
from .triton_atme import atme_step_triton
from .triton_attention import pruned_attention_triton
from .triton_unmerge import unmerge_triton
from .unmerge import unmerge_reference

__all__ = [
    "atme_step",
    "atme_step_cpu",
    "atme_step_reference",
    "atme_step_triton",
    "backend",
    "block_count",
    "pruned_attention",
    "pruned_attention_reference",
    "pruned_attention_triton",
    "unmerge",
    "unmerge_reference",
    "unmerge_triton",
]
