"""Fine-tuning a compressed model back to accuracy (``cait.finetune``): dynamic CDCP gates, ATME in
the training forward, distillation from the dense model. See :mod:`.finetune`."""

from . import finetune

__all__ = ["finetune"]
