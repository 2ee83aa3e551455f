"""The Hugging Face sweep: every vision class of the installed transformers (its image-feature and
image-classification auto mappings) built from its default config on the meta device, then
:func:`cait.compress`: each either works (merging) or is refused with :class:`cait.support.Unsupported`
naming the missing feature; nothing else may happen. ``python tests/hf_sweep.py`` prints the table."""

from __future__ import annotations

import collections
import warnings

import torch

import cait
from cait.support import Unsupported


def vision_classes() -> list[str]:
    """Class names of the installed transformers' image-feature and image-classification auto mappings and cait.hf's tables."""
    import transformers
    from transformers.models.auto import modeling_auto

    from cait.hf import REFUSED, SUPPORTED

    names = {name for name in (*SUPPORTED, *REFUSED) if hasattr(transformers, name)}  # CLIPVisionModel is in no mapping
    for mapping in (modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES, modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
        for value in mapping.values():
            names.update([value] if isinstance(value, str) else value)
    return sorted(names)


def build(name: str):
    """``name`` built from its config class's defaults on the meta device (None: not in this transformers)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        return None
    config_class = getattr(cls, "config_class", None)
    config = config_class()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config).eval()


def outcome(name: str) -> tuple[str, str]:
    """``("works", "")``, ``("refused", feature)``, ``("missing", "")`` or ``("unbuildable", error)``:
    a model transformers itself cannot build from its defaults is not cait's to judge."""
    try:
        model = build(name)
    except Exception as error:  # transformers' own constructors (optional dependencies, required sub-configs)
        return "unbuildable", f"{type(error).__name__}: {str(error)[:80]}"
    if model is None:
        return "missing", ""
    try:
        cait.compress(model, merge=cait.ATME(r=1))
    except Unsupported as error:
        return "refused", error.feature
    return "works", ""


def main() -> None:
    counts = collections.Counter()
    for name in vision_classes():
        kind, detail = outcome(name)
        counts[kind] += 1
        print(f"{name:55s} {kind:11s} {detail}")
    print(dict(counts))


if __name__ == "__main__":
    main()
