"""Small random-init timm models covering the families cait supports (fast enough for CPU tests)."""
import timm
import torch
from timm.layers import SwiGLU, SwiGLUPacked

SUPPORTED = {  # id: (timm name, constructor overrides)
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small_384": ("deit_small_patch16_224", dict(img_size=384, depth=2)),
    "deit_base_384": ("deit_base_patch16_384", dict(depth=1)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=4)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(depth=3)),
    "vit_class_token": ("vit_small_patch16_224", dict(depth=3)),
    "registers_avg": ("vit_base_patch16_reg4_gap_256", dict(embed_dim=192, num_heads=3, depth=3)),
    "avg_pool_class_token": ("vit_small_patch16_224", dict(depth=2, global_pool="avg")),
    "avgmax_pool": ("deit_tiny_patch16_224", dict(depth=3, global_pool="avgmax")),
    "max_pool": ("deit_tiny_patch16_224", dict(depth=3, global_pool="max")),
    "non_square": ("deit_tiny_patch16_224", dict(img_size=(224, 160), depth=4)),
    "odd_grid": ("deit_tiny_patch16_224", dict(img_size=208, depth=4)),
    "qk_norm": ("vit_small_patch16_224", dict(depth=2, qk_norm=True)),
    "swiglu": ("vit_small_patch16_224", dict(depth=2, img_size=128, mlp_layer=SwiGLU, act_layer="silu")),
    "swiglu_packed": ("vit_small_patch16_224", dict(depth=2, img_size=128, mlp_layer=SwiGLUPacked, mlp_ratio=5.33, act_layer="silu")),
}


def build(model_id: str) -> torch.nn.Module:
    name, overrides = SUPPORTED[model_id]
    model = timm.create_model(name, **overrides).eval()
    with torch.no_grad():  # timm zero-inits the head and LayerScale starts tiny: make both matter
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.normal_(0, 0.5)
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, torch.nn.Linear):
                head.weight.normal_(0, 0.05)
    return model


def images_for(model: torch.nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)
