"""The name sweep: every timm model name of the families cait touches, built small (depth 1, a small
image where the constructor takes one, random weights), either compresses on both axes and
round-trips save/load bit for bit, or is refused with NotImplementedError/ValueError naming the
reason. Anything else (another exception, a different output after loading) is a failure.

``python tests/sweep.py`` prints the table for one name per distinct architecture (what
``tests/test_sweep.py`` runs by default); ``python tests/sweep.py --all`` for every name (what
``pytest -m sweep`` runs). A distinct architecture is a distinct module tree at depth 1 (layer types
and settings, digits left out, so widths and depths do not count) plus the root's own tensors and
pooling: a meta-device build, no weights allocated.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch

import cait
from cait.support import Unsupported, check_supported

# The timm modules that define ViT-family models (ViT, DeiT, CLIP/SigLIP/DINOv2/AIMv2 ViTs, FlexiViT, EVA,
# BEiT, SAM, relative-position ViTs, hybrids, NaFlexViT and the VLM vision towers).
FAMILIES = (
    "vision_transformer",
    "deit",
    "eva",
    "beit",
    "vision_transformer_sam",
    "vision_transformer_relpos",
    "vision_transformer_hybrid",
    "naflexvit",
    "qwen3_vit",
    "gemma4_vit",
    "deepseek_vit",
)
GRID = 8  # patches per side of the small image
CDCP_LIMITS = ("with qk_norm", "with scale_attn_norm", "with scale_mlp_norm")  # refusals of one CDCP axis


def names() -> list[str]:
    from timm.models import _registry  # timm has no public map from a name to its module

    return sorted(n for n in timm.list_models() if _registry._model_to_module.get(n) in FAMILIES)


def _create(name: str, device=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device) if device else torch.device("cpu"):
            return timm.create_model(name, pretrained=False, **overrides)


def _weightless(name: str, **overrides):
    """``name`` on the meta device, or with random weights where timm's constructor cannot run there (timm < 1.0.16)."""
    try:
        return _create(name, "meta", **overrides)
    except Exception:
        return _create(name, **overrides)


def small(name: str):
    """``(overrides, meta model)``: constructor overrides that build ``name`` small (depth 1, a GRID x
    GRID patch image), the first set timm accepts, and that model on the meta device (no weights);
    ``(None, None)`` when even the defaults fail."""
    for depth in ({"depth": 1}, {}):
        try:
            meta = _weightless(name, **depth)
        except Exception:
            continue
        patch = getattr(getattr(meta, "patch_embed", None), "patch_size", None)
        if patch is not None:
            sized = dict(depth, img_size=(GRID * patch[0], GRID * patch[1]))
            try:
                return sized, _weightless(name, **sized)
            except Exception:
                pass
        return depth, meta
    return None, None


def signature(model) -> str:
    """What makes two models the same architecture here (see the module docstring)."""
    own = sorted(f"{k}:{tuple(t.shape) != ()}" for k, t in (*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)))
    pools = {k: getattr(model, k, None) for k in ("global_pool", "no_embed_class", "dynamic_img_size", "pool_include_prefix")}
    return re.sub(r"\d+", "#", repr(model)) + repr(own) + repr(pools)


def representatives(all_names: list[str]) -> list[str]:
    """One name per distinct signature: the one with the fewest parameters."""
    groups = collections.defaultdict(list)
    for name in all_names:
        _, model = small(name)
        key = "(not built) " + name if model is None else signature(model)
        groups[key].append((0 if model is None else sum(p.numel() for p in model.parameters()), name))
    return sorted(min(group)[1] for group in groups.values())


@dataclasses.dataclass
class Outcome:
    name: str
    kind: str  # works, refused, not built, FAIL
    reason: str = ""  # refused: what (Unsupported.feature or the error); works: the axes left out; FAIL: what went wrong


def _compress(model):
    """Compress on both axes (a quarter of the tokens the grid allows merged away, half the channels
    pruned); an axis CDCP refuses for this model (qk_norm, scale norms) is left out and named.
    Returns ``(compressed, limits)``."""
    ratios, limits = {"qk": 0.5, "v": 0.5, "mlp": 0.5}, []
    try:  # only a model cait supports has to have these; others are refused below
        grid, depth = tuple(model.patch_embed.grid_size), len(model.blocks)
    except Exception:
        grid, depth = (GRID, GRID), 1
    merge = cait.ATME(r=max(1, cait.ATME(r=0).limit(grid) // (2 * depth)))
    while True:
        try:
            return cait.compress(model, merge=merge, prune=cait.CDCP(**ratios)), limits
        except Unsupported as error:
            axis = error.feature.split(" ", 1)[0]
            if not error.feature.endswith(CDCP_LIMITS) or ratios[axis] == 1:
                raise
            ratios[axis] = 1.0
            limits.append(error.feature)


def check(name: str, folder: Path) -> Outcome:
    """Build ``name`` small, compress it, save, load and compare (module docstring)."""
    overrides, meta = small(name)
    if overrides is None:
        return Outcome(name, "not built", "timm cannot build it with any overrides")
    try:  # cait.compress checks support first, on attributes only: the weightless build answers the same
        check_supported(meta)
    except Unsupported as error:
        return Outcome(name, "refused", error.feature)
    try:
        torch.manual_seed(0)
        model = _create(name, **overrides).eval()
    except Exception as error:
        return Outcome(name, "not built", f"{type(error).__name__}: {error}"[:100])
    try:
        fast, limits = _compress(model)
    except Unsupported as error:
        return Outcome(name, "refused", error.feature)
    except (NotImplementedError, ValueError) as error:
        return Outcome(name, "refused", f"{type(error).__name__}: {error}"[:100])
    except Exception as error:
        return Outcome(name, "FAIL", f"compress raised {type(error).__name__}: {error}"[:200])
    try:
        path = folder / f"{name}.safetensors"
        cait.save(fast, path)
        loaded = cait.load(path)
        images = torch.randn(2, *fast.input_size)
        with torch.no_grad():
            same = torch.equal(loaded(images), fast(images)) and torch.equal(loaded.forward_dense(images), fast.forward_dense(images))
        path.unlink()
    except (NotImplementedError, ValueError) as error:
        return Outcome(name, "FAIL", f"compressed but cannot be saved: {type(error).__name__}: {error}"[:200])
    except Exception as error:
        return Outcome(name, "FAIL", f"save/load raised {type(error).__name__}: {error}"[:200])
    if not same:
        return Outcome(name, "FAIL", "the loaded model computes other outputs")
    if not any(fast.schedule) or all(v is None for block in fast.blocks for v in block.kept.values()):
        return Outcome(name, "FAIL", "compressed on fewer than two axes without saying why")
    return Outcome(name, "works", ", ".join(f"no {limit}" for limit in limits))


def run(selected: list[str]) -> list[Outcome]:
    with tempfile.TemporaryDirectory() as folder:
        return [check(name, Path(folder)) for name in selected]


def table(outcomes: list[Outcome], total_names: int) -> str:
    """Counts by outcome and reason, then every failure."""
    counts = collections.Counter((o.kind, o.reason) for o in outcomes)
    lines = [f"{len(outcomes)} names checked (of {total_names} in {len(FAMILIES)} timm modules)", ""]
    lines += ["| outcome | reason | names |", "|---|---|---|"]
    order = {"works": 0, "refused": 1, "not built": 2, "FAIL": 3}
    for (kind, reason), count in sorted(counts.items(), key=lambda item: (order[item[0][0]], -item[1], item[0][1])):
        lines.append(f"| {kind} | {reason or 'both axes, save/load exact'} | {count} |")
    totals = collections.Counter(o.kind for o in outcomes)
    lines += ["", "totals: " + ", ".join(f"{kind} {totals[kind]}" for kind in order if totals[kind])]
    lines += [f"FAIL {o.name}: {o.reason}" for o in outcomes if o.kind == "FAIL"]
    return "\n".join(lines)


if __name__ == "__main__":
    every = names()
    chosen = every if "--all" in sys.argv else representatives(every)
    print(table(run(chosen), len(every)))
