"""Pictures of the merged regions: which cells of the image each token holds after a block.

``cait.visualize(model, image)`` draws the regions of the final tokens over the input;
``blocks="all"`` gives a strip with the input and one panel per merging block, labelled with the
block index and the spatial tokens left. Styles: ``outline`` draws region borders (a pixel is on a
border when its right or lower neighbour belongs to another token), ``mean`` fills every region with
its mean colour and outlines it, as in the figures of token-merging papers.
"""

from __future__ import annotations

import torch

STYLES = ("outline", "mean")
BORDER = (255, 220, 0)


def _compressed(model):
    """The :class:`cait.CompressedViT` of ``model`` (itself, or a segmentation model's backbone)."""
    from .model import CompressedViT

    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, CompressedViT):
        raise TypeError(f"visualize needs a model made by cait.compress (or a Segmenter on one), got {type(model).__name__}")
    return backbone


def merge_owners(model, images: torch.Tensor) -> list[torch.Tensor]:
    """``owner`` ``(B, Hp, Wp)`` (the spatial token holding each cell) after every block of a
    :class:`cait.CompressedViT` (or a segmentation model on one), for images ``(B, C, H, W)``."""
    backbone = _compressed(model)
    owners = []
    with torch.no_grad():
        state = backbone.embed(images)
        for block in backbone.blocks:
            state = block(state)
            owners.append(state.owner.reshape(len(images), *state.grid))
    return owners


def regions_picture(picture: torch.Tensor, owner: torch.Tensor, style: str = "outline") -> torch.Tensor:
    """Draw regions on ``picture`` ``(H, W, 3)`` uint8 from ``owner`` ``(Hp, Wp)`` (cells of ``H / Hp``
    by ``W / Wp`` pixels); returns a new ``(H, W, 3)`` uint8 tensor."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    height, width = picture.shape[:2]
    if height % owner.shape[0] or width % owner.shape[1]:
        raise ValueError(f"a picture of {height}x{width} px does not split into the {tuple(owner.shape)} grid")
    pixels = owner.repeat_interleave(height // owner.shape[0], 0).repeat_interleave(width // owner.shape[1], 1).long()
    out = picture.clone()
    if style == "mean":
        flat = pixels.flatten()
        sums = torch.zeros(int(flat.max()) + 1, 3).index_add_(0, flat, picture.reshape(-1, 3).float())
        counts = torch.bincount(flat, minlength=len(sums)).clamp_min(1)[:, None]
        out = (sums / counts)[flat].round().to(torch.uint8).reshape(picture.shape)
    border = torch.zeros(height, width, dtype=torch.bool)
    border[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    border[:-1, :] |= pixels[:-1, :] != pixels[1:, :]
    out[border] = torch.tensor(BORDER, dtype=torch.uint8)
    return out


def _input_and_picture(model, image):
    """``(model input (1, C, H, W), picture (H, W, 3) uint8)`` from a PIL image (resized to the model's
    input size, normalized with its timm data config) or a ``(C, H, W)`` tensor already normalized
    (shown min-max scaled)."""
    import numpy as np
    import timm.data
    from PIL import Image

    from .cost import default_input_size

    channels, height, width = default_input_size(model)
    if isinstance(image, Image.Image):
        image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).reshape(height, width, channels) / 255
        config = timm.data.resolve_model_data_config(getattr(model, "backbone", model))
        mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
        if channels != len(mean):
            mean, std = mean.mean().expand(channels), std.mean().expand(channels)
        tensor = ((pixels - mean) / std).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if tuple(image.shape) != (channels, height, width):
            raise ValueError(f"an image tensor must have the model's input shape {(channels, height, width)}, got {tuple(image.shape)}")
        tensor = image.detach().float().cpu()
        low, high = tensor.min(), tensor.max()
        pixels = ((tensor - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0)
    else:
        raise TypeError(f"image must be a PIL image or a (C, H, W) tensor, got {type(image).__name__}")
    picture = (pixels.expand(-1, -1, 3) * 255).round().to(torch.uint8)
    weight = next(model.parameters())
    return tensor[None].to(weight.device, weight.dtype), picture


def visualize(model, image, blocks: int | str = -1, style: str = "outline", scale: int = 1):
    """The merged regions of ``model`` on ``image`` as a ``PIL.Image``.

    Args:
        model: a :class:`cait.CompressedViT` or a segmentation model on one.
        image: a PIL image (resized to the model's input and normalized as timm does), or a
            ``(C, H, W)`` tensor in the model's input format.
        blocks: a block index (default -1: the final tokens) for one picture of the input's size
            times ``scale``; ``"all"`` for the input and every merging block side by side.
        style: ``outline`` or ``mean`` (see the module docstring).
        scale: whole-number upscaling (nearest) before drawing, so small inputs stay readable.
    """
    from PIL import Image, ImageDraw

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1, got {scale!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    backbone = _compressed(model)
    depth = len(backbone.blocks)
    if blocks != "all" and (isinstance(blocks, bool) or not isinstance(blocks, int) or not -depth <= blocks < depth):
        raise ValueError(f"blocks must be 'all' or a block index in [-{depth}, {depth}), got {blocks!r}")
    images, picture = _input_and_picture(model, image)
    owners = [o[0].cpu() for o in merge_owners(model, images)]
    picture = picture.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    if blocks != "all":
        return Image.fromarray(regions_picture(picture, owners[blocks], style).numpy())
    panels, labels = [picture], ["input"]
    for i, (block, owner) in enumerate(zip(backbone.blocks, owners)):
        if block.r:
            panels.append(regions_picture(picture, owner, style))
            labels.append(f"block {i}: {int(owner.max()) + 1} tokens")
    height, width = picture.shape[:2]
    strip = Image.new("RGB", (len(panels) * (width + 4), height + 14), "white")
    draw = ImageDraw.Draw(strip)
    for k, (panel, label) in enumerate(zip(panels, labels)):
        strip.paste(Image.fromarray(panel.numpy()), (k * (width + 4), 0))
        draw.text((k * (width + 4) + 2, height + 2), label, fill="black")
    return strip
