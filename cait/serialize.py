"""Save and load compressed models: one safetensors file whose header carries the cait config.

The config (JSON in the safetensors metadata under ``"cait"``, format :data:`FORMAT`) holds
- ``timm``: the architecture record of the timm model (:mod:`cait.architecture`): model class and
  name, every constructor setting that changes what it computes (activation, norm layers and their
  eps, MLP type, position embedding, final norm, fc norm, pooling, prefix tokens, head,
  LayerScale, ...), stochastic-depth rates and timm's data config;
- ``tile``, ``schedule``, ``kept``: the ATME tile and schedule and every block's kept channels;
- ``head``: a segmentation model's head (:func:`cait.segmentation.head_config`); its tensors
  are the backbone's under ``backbone.`` and the head's under ``head.``;
- ``hf``: a compressed Hugging Face model (:mod:`cait.hf`): its class, its HF config (``to_dict``),
  whether it has a pooler, the compression and the transformers version; the backbone's tensors are
  under ``backbone.``, HF's heads under ``heads.``. Loading it needs ``transformers`` (one clear
  ``ImportError`` line otherwise);
- ``cait_version`` and ``timm_version`` of the writer, for information.

:func:`save` proves the file before writing it: it rebuilds the model from the config it is about to
store (the same code :func:`load` runs) on the model's own tensors, compares the two module trees
(types, settings, tensor shapes) and then their outputs on a fixed probe batch (bit for bit, in the
model's dtype, eval mode), and refuses with one error naming the first difference.
"""

from __future__ import annotations

import json
import os
import stat

import torch
from torch import nn

FORMAT = 2
FORMAT_HISTORY = {
    1: "format 1 (cait 0.1 before the architecture record) stored only the settings that shape the weights, not the "
    "activation, norm eps, MLP type, position embedding, final norm or a replaced head, so loading it may compute a "
    "different function. Re-save it: compress the original timm model again with this cait (cait.compress + cait.save "
    "or `cait compress`)",
}

CONFIG_FIXED = ("attn.rope_channels",)  # tensors in state_dict() that the config's kept channels also give
CONFIG_KEYS = (("timm", dict), ("tile", int), ("schedule", list), ("kept", list))
ARCHITECTURE_KEYS = (
    ("name", (str, type(None))), ("class", str), ("kwargs", dict), ("drop_path", list), ("flags", dict), ("pretrained_cfg", dict),
)  # fmt: skip


def _is_hf(model) -> bool:
    from .hf import HFCompressed

    return isinstance(model, HFCompressed)


def _backbone(model):
    from .model import CompressedViT
    from .segmentation import Segmenter

    backbone = model.backbone if isinstance(model, Segmenter) or _is_hf(model) else model
    if not isinstance(backbone, CompressedViT):
        raise TypeError(
            f"cait.save takes a model made by cait.compress (a timm or Hugging Face one) or a Segmenter on one, got {type(model).__name__}"
            + (f" on a {type(backbone).__name__}" if backbone is not model else "")
        )
    return backbone


def config_of(model) -> dict:
    """The config :func:`save` stores for ``model`` (a compressed model or a Segmenter on one)."""
    import timm

    from . import __version__
    from .segmentation import head_config

    backbone = _backbone(model)
    config = {
        "format": FORMAT,
        "cait_version": __version__,
        "timm_version": timm.__version__,
        "timm": backbone.architecture(),
        "tile": backbone.tile,
        "position": backbone.position,
        "dynamic_img_size": backbone.dynamic_img_size,
        "schedule": list(backbone.schedules[backbone.native_grid]),
        "merge_flops": backbone.merge.flops if backbone.merge is not None else None,
        "kept": [block.kept for block in backbone.blocks],
    }
    reference_grid, counts = backbone.reference_schedule
    if reference_grid != backbone.native_grid:  # resized by set_input_size: other grids scale from the counts as set
        config["reference_schedule"] = {"grid": list(reference_grid), "counts": list(counts)}
    if backbone.origin:
        config["origin"] = backbone.origin
    if _is_hf(model):
        config["hf"] = model.record()
    elif backbone is not model:
        config["head"] = head_config(model.head)
    return config


def _refuse_what_a_file_cannot_hold(model: nn.Module) -> None:
    _backbone(model).check_grid()
    if getattr(_backbone(model), "gated", False):
        raise ValueError("dynamic CDCP gates are attached: materialize them first (gates.materialize() or Student.materialize())")
    for path, module in model.named_modules():
        hooks = [kind for kind in ("_forward_hooks", "_forward_pre_hooks") if getattr(module, kind, None)]
        if hooks:
            kind = hooks[0].strip("_").replace("_", " ")
            raise ValueError(f"{path or 'the model'} has {kind}: a saved file cannot hold hooks, remove them first")


def skeleton(config: dict) -> nn.Module:
    """The model a config describes, on the meta device (no weights yet: :func:`fill` them)."""
    from . import architecture
    from .cdcp import prune_block
    from .model import CompressedViT
    from .rope import DEFAULT_RULE, RULES
    from .schedule import ATME
    from .segmentation import Segmenter, make_head

    position = config.get("position", DEFAULT_RULE)
    if position not in RULES:
        raise ValueError(f"the config places merged tokens by {position!r}, not one of {RULES}")
    model = CompressedViT(
        architecture.build(config["timm"]),
        tile=config["tile"],
        source=config["timm"],
        position=position,
        dynamic_img_size=bool(config.get("dynamic_img_size", False)),
    )
    if len(config["kept"]) != len(model.blocks):
        raise ValueError(f"the config lists kept channels for {len(config['kept'])} blocks, the architecture has {len(model.blocks)}")
    for i, (block, kept) in enumerate(zip(model.blocks, config["kept"])):
        if any(v is not None for v in kept.values()):
            indices = _kept_tensors(i, block, kept)
            prune_block(block, indices)
            if block.attn.rope_channels is not None:  # fixed by the config: fill() checks the file agrees
                block.attn.rope_channels = indices["qk"]
    model.set_schedule(config["schedule"])
    if "reference_schedule" in config:
        reference = config["reference_schedule"]
        model.reference_schedule = (tuple(reference["grid"]), tuple(reference["counts"]))
    model.origin = config.get("origin")
    if config.get("merge_flops") is not None:  # other input sizes solve the same FLOPs target, as the saved model did
        model.merge = ATME(flops=float(config["merge_flops"]), block=config["tile"], position=position)
    if "hf" in config:
        from .hf import from_record

        return from_record(model, config["hf"])
    if "head" in config:
        head = dict(config["head"])
        with torch.device("meta"):
            model = Segmenter(model, make_head(head.pop("kind"), model.embed_dim, head.pop("classes"), **head))
    return model


def _kept_tensors(i: int, block, kept: dict) -> dict:
    """A block's kept channels as index tensors, checked against the unpruned block they index."""
    sizes = {"qk": (block.attn.heads, block.attn.d_qk), "v": (block.attn.heads, block.attn.d_v), "mlp": (block.mlp.fc2.in_features,)}
    if set(kept) != set(sizes):
        raise ValueError(f"block {i}'s kept channels name {sorted(kept)}, not {sorted(sizes)}")
    tensors = {}
    for name, indices in kept.items():
        if indices is None:
            tensors[name] = None
            continue
        t, size = torch.tensor(indices), sizes[name]
        in_range = t.numel() > 0 and 0 <= int(t.min()) and int(t.max()) < size[-1]
        if t.dim() != len(size) or t.shape[:-1] != size[:-1] or not in_range:
            raise ValueError(f"block {i}'s kept {name} channels do not fit the architecture ({sizes[name]} channels)")
        tensors[name] = t
    return tensors


def fill(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Give a :func:`skeleton` its tensors (no copy: ``load_state_dict(assign=True)``); eval mode.
    ValueError naming the first tensor that is missing, unexpected or of another shape."""
    expected = model.state_dict()
    # What the config already fixes (a pruned RoPE head's channel map, from its kept channels): the file must
    # agree; files written before the map joined state_dict() lack it and take the config's
    fixed = {k: v for k, v in expected.items() if k.endswith(CONFIG_FIXED)}
    for name, value in fixed.items():
        if name in tensors and not torch.equal(tensors[name].cpu().long(), value.cpu().long()):
            raise ValueError(f"the weights disagree with the config: {name} is not the channel map the config's kept channels give")
    tensors = {**{k: v for k, v in fixed.items() if k not in tensors}, **tensors}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    for names, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")):
        if names:
            first = names[0]
            detail = f" ({tuple(tensors[first].shape)}, the architecture needs {tuple(expected[first].shape)})" if names is reshaped else ""
            raise ValueError(f"the weights do not fit the rebuilt architecture: {len(names)} tensors {what}, first {names[0]}{detail}")
    model.load_state_dict(tensors, strict=True, assign=True)
    _backbone(model).init_non_persistent_buffers()  # built on the meta device with the weights
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the rebuilt model has no values for {left[0]}: neither the file nor its constructor sets it")
    return model.eval()


def _probe_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    backbone = _backbone(model)
    state = backbone.forward_tokens(images)
    if _is_hf(model):  # every tensor of HF's output (hidden states included)
        out = model(images, output_hidden_states=True, return_dict=False)
        return [state.x, state.size, state.owner, *(t for t in out if isinstance(t, torch.Tensor)), *out[-1]]
    return [state.x, state.size, state.owner, model(images)]


def verify(model: nn.Module, config: dict) -> None:
    """Rebuild ``model`` from ``config`` on its own tensors and refuse (ValueError, naming the first
    difference) unless the module trees match and the outputs on a fixed probe batch are identical."""
    from .architecture import first_difference

    rebuilt = skeleton(config)
    difference = first_difference(model, rebuilt)
    if difference:
        raise ValueError(f"cait.save cannot store this model exactly: {difference}")
    fill(rebuilt, model.state_dict())
    weight = next((t for t in model.parameters() if t.is_floating_point()), None)
    backbone = _backbone(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *backbone.input_size, generator=generator).to(weight.device, weight.dtype)
    modes = {module: module.training for module in model.modules()}
    rebuilt.to(backbone.cell_index.device)
    try:
        model.eval()
        with torch.no_grad():
            ours, theirs = _probe_outputs(model, images), _probe_outputs(rebuilt, images)
    finally:
        for module, mode in modes.items():
            module.training = mode
    names = ("tokens", "token sizes", "owners", *("output",) * (len(ours) - 3))
    for name, a, b in zip(names, ours, theirs, strict=True):
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(
                f"cait.save cannot store this model exactly: rebuilt from the recorded settings it computes other {name} on a "
                f"probe batch although every module and setting matches (is a method patched or a global flag set?)"
            )


def save(model, path: str | os.PathLike) -> None:
    """Write a :class:`cait.CompressedViT`, or a :class:`cait.segmentation.Segmenter` whose backbone is
    one, (weights and config) to ``path`` (``.safetensors``), after proving that the file rebuilds the
    same function (module docstring).

    Raises ``TypeError`` for other models, ``FileNotFoundError`` when the folder does not exist,
    ``IsADirectoryError`` when ``path`` is a folder,
    ``ValueError`` (or :class:`cait.support.Unsupported` for a head the format cannot hold) naming what
    the file could not reproduce: attached gates, hooks, a setting the record misses.
    """
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name (.safetensors)")
    _refuse_what_a_file_cannot_hold(model)
    config = config_of(model)
    verify(model, config)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    target = os.path.realpath(os.fspath(path))  # through a symbolic link, as open() writes
    kept = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else None
    save_file(tensors, target, metadata={"cait": json.dumps(config)})
    os.chmod(target, _usual_mode() if kept is None else kept)


def _usual_mode() -> int:
    """The permissions ``open()`` gives a new file (safetensors writes 0600 whatever the umask, and
    replaces an existing file): 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_config(path: str | os.PathLike) -> dict:
    """The cait config stored in a file written by :func:`save`; ValueError for foreign, older or newer files."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder: give a .safetensors file written by cait.save")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if "cait" not in metadata:
        raise ValueError(f"{path} has no cait config: it was not written by cait.save")
    try:
        config = json.loads(metadata["cait"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the cait config is not valid JSON ({error})") from error
    version = config.get("format") if isinstance(config, dict) else None
    if version in FORMAT_HISTORY:
        raise ValueError(f"{path} has cait {FORMAT_HISTORY[version]}")
    if version != FORMAT:
        raise ValueError(f"{path} has cait format {version!r}; this cait reads format {FORMAT}: upgrade cait to load it")
    missing = [key for key, kind in CONFIG_KEYS if not isinstance(config.get(key), kind)]
    arch = config.get("timm") if isinstance(config.get("timm"), dict) else {}
    missing += [f"timm.{key}" for key, kind in ARCHITECTURE_KEYS if arch and not isinstance(arch.get(key), kind)]
    if missing:
        raise ValueError(f"{path}: the cait config lacks or mistypes {', '.join(missing)}: the file is damaged")
    return config


def is_cait_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with a cait config (of any format)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return "cait" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def _without_classifier(tensors: dict, expected: dict) -> dict:
    """A segmentation file's tensors less those of the backbone parts a :class:`Segmenter` drops
    (:func:`cait.segmentation.drop_classifier`), which the dense features never used."""
    from .segmentation.model import CLASSIFIER_PARTS

    prefixes = tuple(f"backbone.vit.{part}." for part in CLASSIFIER_PARTS)
    return {name: t for name, t in tensors.items() if name in expected or not name.startswith(prefixes)}


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the compressed model (or segmentation model) saved at ``path``; returns it in eval
    mode on ``device``, in the dtype it was saved in. FileNotFoundError / IsADirectoryError /
    ValueError name what is wrong with a missing, foreign, older or newer file, or a folder."""
    from safetensors.torch import load_file

    config = read_config(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot load {path} onto {device}: no CUDA GPU is visible")
    if device.type == "meta":
        raise ValueError(f"cannot load {path} onto the meta device: a loaded model has its weights (build on meta with timm instead)")
    try:
        tensors = load_file(os.fspath(path), device=str(device))
    except Exception as error:  # safetensors' own error types
        raise ValueError(f"{path}: cannot read its tensors ({error})") from error
    try:
        model = skeleton(config)
        if "head" in config:  # files from before segmenters dropped their backbone's classifier hold its (unused) tensors
            tensors = _without_classifier(tensors, model.state_dict())
        model = fill(model, tensors)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return model.to(device).eval()
