"""cait: compress timm Vision Transformers by merging neighbouring tokens (ATME) and pruning channels (CDCP).

>>> fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75))
"""
from .cdcp import CDCP
from .cost import flops
from .gates import Gates, attach_gates
from .graphs import CudaGraph, cuda_graph
from .model import CompressedViT, compress
from .schedule import ATME
from .serialize import load, save
from .tokens import TokenState
from .visualize import visualize

__all__ = [
    "ATME",
    "CDCP",
    "CompressedViT",
    "CudaGraph",
    "Gates",
    "TokenState",
    "attach_gates",
    "compress",
    "cuda_graph",
    "flops",
    "load",
    "save",
    "visualize",
]
__version__ = "0.1.0"
