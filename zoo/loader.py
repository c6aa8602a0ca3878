"""safetensors checkpoint -> model parameters, fused and converted on the way in.

Only safetensors are read (never pickled .bin files). Tensors are read one at a time through
`safe_open`; a fused parameter (qkv, gate_up) is allocated once in the target dtype and each
checkpoint piece is copied into its rows and dropped, so an unfused and a fused copy never coexist.
All names and shapes are checked from the file headers before any tensor data is read.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
# Checkpoint tensors that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint folder does not hold the tensors the model needs."""


class SafetensorsCheckpoint:
    """Tensor name -> file, with lazily opened files. Reads headers only until get() is called."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.name_to_file = self._index(model_dir)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _index(model_dir: str) -> dict[str, str]:
        index_path = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
            for fname in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(model_dir, fname)):
                    raise CheckpointError(f"{index_path} names shard {fname!r}, which is missing")
            return {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            pickles = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {pickles}: zoo never loads pickled weights; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"no *.safetensors weights in {model_dir!r}{hint}")
        names: dict[str, str] = {}
        for fname in files:
            path = os.path.join(model_dir, fname)
            for name in _open(path).keys():
                names[name] = path
        return names

    def _handle(self, path: str):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.name_to_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.name_to_file[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.name_to_file[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap their file when dropped


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e}") from None


def _expected_piece_shapes(model: nn.Module, name: str, shape: tuple[int, ...], n_pieces: int) -> list[tuple[int, ...]]:
    """Split a fused parameter's shape into the shapes of its checkpoint pieces (along dim 0)."""
    if n_pieces == 1:
        return [shape]
    rows = model.fused_row_split(name)
    return [(r, *shape[1:]) for r in rows]


def load_weights(model: nn.Module, model_dir: str, dtype: torch.dtype, device: torch.device) -> None:
    """Fill `model` (built on the meta device) with the checkpoint's weights, in place."""
    ckpt = SafetensorsCheckpoint(model_dir)
    plan = model.checkpoint_sources()  # our name -> [checkpoint names]
    params = dict(model.named_parameters())

    # 1. validate names and shapes from the headers alone
    available = ckpt.names()
    used: set[str] = set()
    for name, sources in plan.items():
        want = _expected_piece_shapes(model, name, tuple(params[name].shape), len(sources))
        for src, shape in zip(sources, want):
            if src not in available:
                raise CheckpointError(
                    f"checkpoint {model_dir!r} is missing tensor {src!r} (expected shape {list(shape)})"
                )
            found = ckpt.shape(src)
            if found != shape:
                raise CheckpointError(
                    f"tensor {src!r} in {model_dir!r} has shape {list(found)}, expected {list(shape)}"
                )
            used.add(src)
    tied_head = "lm_head.weight" if model.config.tie_word_embeddings else None
    unexpected = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES) and n != tied_head)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint {model_dir!r} has tensors the {model.config.architecture} model does not use: "
            f"{unexpected[:5]}{more}"
        )

    # 2. read, fuse and convert one tensor at a time
    state = {}
    for name, sources in plan.items():
        out = torch.empty(params[name].shape, dtype=dtype, device=device)
        row = 0
        for src in sources:
            piece = ckpt.get(src)
            out[row:row + piece.shape[0]].copy_(piece)
            row += piece.shape[0]
            del piece
        state[name] = out
    ckpt.close()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen when the plan covers every parameter; guard the invariant
            raise CheckpointError(f"parameter {name!r} was not loaded")
