"""Small random-init timm models covering the families cait supports (fast enough for CPU tests)."""
import pytest
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
    "siglip_map": ("vit_base_patch16_siglip_224", dict(img_size=96, embed_dim=96, num_heads=3, depth=2)),
}

# The Eva family (cait.eva): RoPE of every kind timm has, fused and separate q/k/v, SwiGLU, registers,
# absolute position embeddings with and without RoPE, attention pooling. Small widths and grids.
ROPE = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=70, embed_dim=96, num_heads=2, depth=2)),
    "eva02_separate_qkv": ("eva02_base_patch14_224", dict(img_size=56, embed_dim=96, num_heads=2, depth=2)),
    "rope_axial_odd": ("vit_small_patch16_rope_224", dict(img_size=(80, 48), embed_dim=96, num_heads=2, depth=2)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, embed_dim=96, num_heads=2, depth=2)),
    "rope_ape": ("vit_small_patch16_rope_ape_224", dict(img_size=64, embed_dim=96, num_heads=2, depth=2)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=(64, 80), embed_dim=96, num_heads=2, depth=2)),
    "dinov3_qkvb_token": ("vit_small_patch16_dinov3_qkvb", dict(img_size=64, embed_dim=96, num_heads=2, depth=2, global_pool="token")),
    "sbb_rope_registers": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=64, embed_dim=96, num_heads=2, depth=2)),
    "pe_core_map": ("vit_pe_core_tiny_patch16_384", dict(img_size=(48, 64), embed_dim=96, num_heads=2, depth=2, attn_pool_num_heads=2)),
}


# Families cait supports from timm 1.0.16 (AttentionRope, attention pooling with a mask); `make compat`
# runs the suite on an older timm, where these are refused by name (tested in test_model.py).
NEEDS_TIMM_1_0_16 = {"siglip_map", *ROPE}


def too_old(model_id: str) -> bool:
    """Whether the installed timm predates what cait needs for ``model_id``'s family."""
    return model_id in NEEDS_TIMM_1_0_16 and tuple(int(p) for p in timm.__version__.split(".")[:3]) < (1, 0, 16)


def build(model_id: str) -> torch.nn.Module:
    name, overrides = SUPPORTED[model_id] if model_id in SUPPORTED else ROPE[model_id]
    if too_old(model_id):
        pytest.skip(f"timm {timm.__version__} predates {model_id}'s family in cait (1.0.16)")
    model = timm.create_model(name, **overrides).eval()
    with torch.no_grad():  # timm zero-inits the head, LayerScale starts tiny and Eva's q/v biases at zero: make all matter
        for module in model.modules():
            for gamma in ("gamma", "gamma_1", "gamma_2"):
                if isinstance(getattr(module, gamma, None), torch.nn.Parameter):
                    getattr(module, gamma).normal_(0, 0.5)
            for bias in ("q_bias", "v_bias"):
                if isinstance(getattr(module, bias, None), torch.nn.Parameter):
                    getattr(module, bias).normal_(0, 0.1)
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, torch.nn.Linear):
                head.weight.normal_(0, 0.05)
    return model


def images_for(model: torch.nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)
