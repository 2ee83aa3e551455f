"""A folder of trained benchmark models, so long training benchmarks resume where they stopped and can
be timed again without training (``--time-only``).

Layout: ``FOLDER/seed<k>/<name>.pt`` holds one trained model, pickled whole by ``torch.save`` (it is a
cache this benchmark wrote itself, loaded with ``weights_only=False``: never point it at files from
elsewhere); ``FOLDER/seed<k>/scores.json`` maps each name to its scores (accuracy, FLOPs, ...) and
``FOLDER/seed<k>/timing.json`` to its last measured images/s. Files are written to a temporary name
and renamed, so an interrupted run leaves no half-written model behind.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn


def slug(name: str) -> str:
    """A file name for a model name: ``CAIT (fine-tuned) @0.50`` -> ``cait-fine-tuned-0.50``."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


class RunFolder:
    """Trained models and their scores under ``folder``, by seed and model name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)

    def _seed_dir(self, seed: int) -> str:
        return os.path.join(self.folder, f"seed{seed}")

    def _write(self, path: str, write) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path + ".tmp")
        os.replace(path + ".tmp", path)

    def _read_json(self, seed: int, kind: str) -> dict:
        path = os.path.join(self._seed_dir(seed), f"{kind}.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def _write_json(self, seed: int, kind: str, data: dict) -> None:
        def dump(path):
            with open(path, "w") as f:
                json.dump(data, f, indent=2)

        self._write(os.path.join(self._seed_dir(seed), f"{kind}.json"), dump)

    def has(self, seed: int, name: str) -> bool:
        """Whether ``name`` of ``seed`` is done: its scores are stored (with the model, if one was saved)."""
        return name in self.scores(seed)

    def _model_path(self, seed: int, name: str) -> str:
        return os.path.join(self._seed_dir(seed), slug(name) + ".pt")

    def save(self, seed: int, name: str, model: nn.Module | None, scores: dict) -> None:
        """Store a trained model (None: scores only) and its scores, replacing earlier ones of the same name."""
        if model is not None:
            self._write(self._model_path(seed, name), lambda path: torch.save(model, path))
        self._write_json(seed, "scores", {**self.scores(seed), name: scores})

    def load(self, seed: int, name: str) -> nn.Module:
        """A stored model, in eval mode on the CPU."""
        path = self._model_path(seed, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no trained model {name!r} for seed {seed}; train it first (run without --time-only)")
        try:
            return torch.load(path, map_location="cpu", weights_only=False).eval()
        except ValueError as error:  # pickled by an older cait (cait.layers.CompressedModule)
            raise ValueError(f"{path}: {error}; delete it (and {name!r} in scores.json) to train it again") from error

    def scores(self, seed: int) -> dict:
        """``{name: scores}`` of every stored model of ``seed``."""
        return self._read_json(seed, "scores")

    def save_speeds(self, seed: int, speeds: dict) -> None:
        """Images/s of the models of ``seed`` from one timing run (replaces the previous run's)."""
        self._write_json(seed, "timing", speeds)

    def speeds(self, seed: int) -> dict:
        """``{name: images/s}`` of the last timing run of ``seed``."""
        return self._read_json(seed, "timing")
