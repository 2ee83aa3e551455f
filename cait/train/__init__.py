"""Fine-tuning a compressed model back to accuracy (``cait.finetune``): dynamic CDCP gates, ATME in the
training forward, distillation from the dense model (:mod:`.finetune`); the hyperparameters and their
presets (:mod:`.recipe`, free of torch, so ``cait finetune --help`` stays fast); timm's components built
from a recipe (:mod:`.components`). Sub-modules load on first use."""

import importlib

__all__ = ["components", "finetune", "recipe"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
