"""cait: compress timm Vision Transformers by merging neighbouring tokens (ATME) and pruning channels (CDCP).

>>> fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75))

The names below load on first use (PEP 562), so ``import cait`` and ``cait --help`` do not import
torch and timm until a name that needs them is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_NAMES = {  # public name -> module that defines it (relative to this package)
    "ATME": ".schedule",
    "CDCP": ".cdcp",
    "CompressedViT": ".model",
    "CudaGraph": ".graphs",
    "FlopsRatio": ".planner",
    "Gates": ".gates",
    "Latency": ".planner",
    "Optimized": ".compiled",
    "Plan": ".planner",
    "Speedup": ".planner",
    "TokenState": ".tokens",
    "attach_gates": ".gates",
    "compress": ".model",
    "cuda_graph": ".graphs",
    "export": ".exported",
    "flops": ".cost",
    "load": ".serialize",
    "load_exported": ".exported",
    "optimize": ".compiled",
    "plan": ".planner",
    "save": ".serialize",
    "visualize": ".regions",
}
_MODULES = {"finetune": ".train.finetune", "hf": ".hf", "planner": ".planner", "segmentation": ".segmentation"}  # public sub-modules

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'cait' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
