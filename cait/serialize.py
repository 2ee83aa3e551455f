"""Save and load compressed models: one safetensors file whose header carries the cait config.

The config (JSON in the safetensors metadata under ``"cait"``) holds the timm architecture
(name and constructor arguments), the ATME tile and schedule, and every block's kept channels, so a
compressed model loads without the original weights. A segmentation model
(:class:`cait.segmentation.Segmenter` on a compressed backbone) adds its head (kind and classes);
its tensors are the backbone's under ``backbone.`` and the head's under ``head.``.
"""
from __future__ import annotations

import json
import os

import torch

FORMAT = 1


def save(model, path: str | os.PathLike) -> None:
    """Write a :class:`cait.CompressedViT`, or a :class:`cait.segmentation.Segmenter` whose backbone is
    one, (weights and config) to ``path`` (``.safetensors``)."""
    from safetensors.torch import save_file

    from .model import CompressedViT
    from .segmentation import Segmenter, head_kind

    backbone = model.backbone if isinstance(model, Segmenter) else model
    if not isinstance(backbone, CompressedViT):
        raise TypeError(
            f"cait.save takes a model made by cait.compress or a Segmenter on one, got {type(model).__name__}"
            + (f" on a {type(backbone).__name__}" if backbone is not model else "")
        )
    config = {
        "format": FORMAT,
        "timm": backbone.source,
        "tile": backbone.tile,
        "schedule": list(backbone.schedule),
        "kept": [block.kept for block in backbone.blocks],
    }
    if backbone is not model:
        config["head"] = {"kind": head_kind(model.head), "classes": model.num_classes}
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"cait": json.dumps(config)})


def read_config(path: str | os.PathLike) -> dict:
    """The cait config stored in a file written by :func:`save`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if "cait" not in metadata:
        raise ValueError(f"{path} has no cait config: it was not written by cait.save")
    config = json.loads(metadata["cait"])
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} has cait format {config.get('format')}, this version reads format {FORMAT}")
    return config


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the compressed model (or segmentation model) saved at ``path``; returns it in eval
    mode on ``device``."""
    import timm
    from safetensors.torch import load_file

    from .cdcp import prune_block
    from .model import CompressedViT
    from .segmentation import Segmenter, make_head

    config = read_config(path)
    dense = timm.create_model(config["timm"]["name"], pretrained=False, **config["timm"]["kwargs"])
    model = CompressedViT(dense, tile=config["tile"], source=config["timm"])
    for block, kept in zip(model.blocks, config["kept"], strict=True):
        if any(v is not None for v in kept.values()):
            prune_block(block, {k: None if v is None else torch.tensor(v) for k, v in kept.items()})
    model.set_schedule(config["schedule"])
    if "head" in config:
        model = Segmenter(model, make_head(config["head"]["kind"], model.embed_dim, config["head"]["classes"]))
    try:
        model.load_state_dict(load_file(os.fspath(path)), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the rebuilt {config['timm']['name']}: {error}") from error
    return model.to(device).eval()
