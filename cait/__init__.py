"""cait: compress timm Vision Transformers by merging neighbouring tokens (ATME) and pruning channels (CDCP).

>>> fast = cait.compress(model, merge=cait.ATME(flops=0.6))
"""
from .cost import flops
from .model import CompressedViT, compress
from .schedule import ATME
from .tokens import TokenState

__all__ = ["ATME", "CompressedViT", "TokenState", "compress", "flops"]
__version__ = "0.1.0"
