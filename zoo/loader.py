"""safetensors checkpoint -> model parameters, fused and converted on the way in.

Only safetensors are read (never pickled .bin files). Every file is opened with `safe_open`,
which validates it and lists its tensors; all names and shapes are checked against the model
before any tensor data is read. Each parameter is then allocated once, in the target dtype, and
its checkpoint pieces (q/k/v, gate/up) are read into their rows in bounded chunks with positioned
file reads, so an unfused and a fused copy never coexist.

Why not `safe_open(...).get_tensor`: it reads through a memory map, and the touched file pages
count towards the process's RSS until the handle is closed — on top of the copy we keep. That
measured a 2.0x peak RSS over the weight bytes on a 100 MB checkpoint; chunked reads keep it near
1.0x (tests/test_loader.py measures it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from zoo.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
READ_CHUNK_BYTES = 4 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# Checkpoint tensors that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class CheckpointRows:
    """Rows [start, stop) of checkpoint tensor `name`, as one source of a parameter: how a modeling
    file names a piece the checkpoint stores fused with others (Qwen-1's c_attn holds [q; k; v])."""

    name: str
    start: int
    stop: int


def _source_name(src: "str | CheckpointRows") -> str:
    return src.name if isinstance(src, CheckpointRows) else src


def _rows_of_source(src: "str | CheckpointRows", part):
    """The read of checkpoint tensor `_source_name(src)` that gives `part` of source `src`."""
    if not isinstance(src, CheckpointRows):
        return part
    if part is None:
        return (0, src.start, src.stop)
    dim, first, last = part
    if dim != 0:
        raise CheckpointError(f"a column range of rows {src.start}:{src.stop} of {src.name!r} cannot be read")
    return (0, src.start + first, src.start + last)


class SafetensorsCheckpoint:
    """Tensor name -> (file, header entry). Holds only headers; data is read on demand."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.name_to_file = self._index(model_dir)
        self._headers: dict[str, tuple[int, dict]] = {}

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
            for name in _validated_keys(path):
                names[name] = path
        return names

    def _entry(self, name: str) -> tuple[str, int, dict]:
        path = self.name_to_file[name]
        if path not in self._headers:
            keys = _validated_keys(path)  # safetensors checks offsets against the file size
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            self._headers[path] = (8 + header_len, header)
            missing = {n for n, p in self.name_to_file.items() if p == path} - set(keys)
            if missing:
                raise CheckpointError(f"{path!r} lacks tensors its index names: {sorted(missing)[:5]}")
        data_start, header = self._headers[path]
        return path, data_start, header[name]

    def names(self) -> set[str]:
        return set(self.name_to_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        path, _, entry = self._entry(name)
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path!r} has unsupported dtype {entry['dtype']}")
        return _DTYPES[entry["dtype"]]

    def read_into(self, name: str, out: torch.Tensor, part: tuple[int, int, int] | None = None) -> None:
        """Copy tensor `name` (or its `part` = (dim, start, stop): a row range for dim 0, a column
        range of a 2-D tensor for dim 1) into `out` (that shape, any dtype/device). Only the bytes
        of the part are kept: a row range is one positioned read, a column range is read in
        bounded chunks of whole rows through one reused buffer."""
        path, data_start, entry = self._entry(name)
        src_dtype = _DTYPES.get(entry["dtype"])
        if src_dtype is None:
            raise CheckpointError(f"tensor {name!r} in {path!r} has unsupported dtype {entry['dtype']}")
        shape = entry["shape"]
        rows = shape[0] if shape else 1
        row_elems = 1
        for n in shape[1:]:
            row_elems *= n
        row_bytes = row_elems * src_dtype.itemsize
        dim, first, last = part or (0, 0, rows)
        with open(path, "rb") as f:
            if dim == 0:
                f.seek(data_start + entry["data_offsets"][0] + first * row_bytes)
                if out.dtype == src_dtype and out.device.type == "cpu" and out.is_contiguous():
                    _read_exact(f, out, path, name)  # straight into the parameter: no staging copy
                    return
                # other dtype or device: convert a few MB at a time through one reused buffer
                flat = out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(-1, 1)
                self._chunked(f, flat, flat.shape[1], src_dtype, path, name, lambda chunk: chunk)
                return
            if dim != 1 or len(shape) != 2:
                raise CheckpointError(f"cannot read part {part} of tensor {name!r} with shape {shape}")
            f.seek(data_start + entry["data_offsets"][0])
            self._chunked(f, out, shape[1], src_dtype, path, name, lambda chunk: chunk[:, first:last])

    @staticmethod
    def _chunked(f, out2d: torch.Tensor, src_cols: int, src_dtype, path: str, name: str, select) -> None:
        """Read out2d.shape[0] rows of src_cols elements, a few MB at a time, into out2d."""
        rows_per_chunk = max(1, READ_CHUNK_BYTES // max(1, src_cols * src_dtype.itemsize))
        staging = torch.empty(min(rows_per_chunk, out2d.shape[0]), src_cols, dtype=src_dtype)
        for r0 in range(0, out2d.shape[0], rows_per_chunk):
            chunk = staging[: min(rows_per_chunk, out2d.shape[0] - r0)]
            _read_exact(f, chunk, path, name)
            out2d[r0:r0 + chunk.shape[0]].copy_(select(chunk))


def _read_exact(f, out: torch.Tensor, path: str, name: str) -> None:
    nbytes = out.numel() * out.element_size()
    if f.readinto(out.view(-1).view(torch.uint8).numpy()) != nbytes:
        raise CheckpointError(f"{path!r} ends inside tensor {name!r}")


def _validated_keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e}") from None


def _checkpoint_pieces(model: nn.Module, name: str, shape: tuple[int, ...], n_pieces: int) -> list[tuple]:
    """(global shape, part or None) of each checkpoint tensor parameter `name` is built from. A
    tensor-parallel layer (zoo.layers.linear / embedding) says which part of it this rank holds."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if hasattr(module, "checkpoint_pieces"):
        pieces = module.checkpoint_pieces(leaf)
        if len(pieces) != n_pieces:
            raise CheckpointError(f"parameter {name!r} is built from {n_pieces} checkpoint tensors, "
                                  f"but its layer describes {len(pieces)}")
        return pieces
    if n_pieces == 1:
        return [(shape, None)]
    raise CheckpointError(f"parameter {name!r} is fused from {n_pieces} checkpoint tensors, but its layer "
                          f"({type(module).__name__}) does not say where each goes (checkpoint_pieces); fuse "
                          "parameters in the parallel linear layers of zoo.layers.linear")


def _plan_quantize_on_load(model: nn.Module, plan: dict, pieces: dict, available: set[str]) -> dict[str, nn.Module]:
    """For each quantized layer (zoo.layers.linear.QuantizableLinear with a quant_mode) whose stored
    tensors (`qweight`, ...) the checkpoint lacks but whose float `weight` it has: replace the
    stored tensors in `plan` / `pieces` by one entry reading the float weight (the layer's
    float_weight_pieces, into float_weight_shape). Returns that entry's name -> the layer, whose
    quantized_state() turns the weight read into the stored tensors."""
    by_layer: dict[str, nn.Module] = {}
    for name in list(plan):
        layer_path, _, leaf = name.rpartition(".")
        if leaf != "qweight":
            continue
        if all(_source_name(src) in available for src in plan[name]):
            continue  # a quantized checkpoint: read as is
        layer = model.get_submodule(layer_path)
        weight_sources = [_with_leaf(src, "weight") for src in plan[name]]
        if not all(_source_name(src) in available for src in weight_sources):
            continue  # neither form: step 1 reports the missing stored tensor
        for stored in [n for n in plan if n.rpartition(".")[0] == layer_path and n.rpartition(".")[2] != "bias"]:
            del plan[stored], pieces[stored]
        weight = f"{layer_path}.weight"
        plan[weight], pieces[weight] = weight_sources, layer.float_weight_pieces()
        by_layer[weight] = layer
    return by_layer


def _with_leaf(src: "str | CheckpointRows", leaf: str) -> "str | CheckpointRows":
    """The same checkpoint source with its last name component (qweight, ...) replaced by leaf."""
    if isinstance(src, CheckpointRows):
        return CheckpointRows(f"{src.name.rpartition('.')[0]}.{leaf}", src.start, src.stop)
    return f"{src.rpartition('.')[0]}.{leaf}"


def _part_rows(part, out_rows: int) -> int:
    return out_rows if part is None or part[0] != 0 else part[2] - part[1]


def load_weights(model: nn.Module, model_dir: str, dtype: torch.dtype, device: torch.device,
                 check_finite: bool = True) -> None:
    """Fill `model` (built on the meta device) with the checkpoint's weights, in place. Under
    tensor parallelism (model.tp) each rank reads only its shard of every tensor. A folder written
    by tools/merge_qkv_weight.py (a TP_MANIFEST and rank_<r>/ sub-folders) holds the shards
    already fused and sliced; it is read as is. check_finite: refuse a weight holding NaN / inf
    (benches/weight_check_cost.py measures what the check costs)."""
    tp = getattr(model, "tp", None)
    rank, world_size = (tp.rank, tp.world_size) if tp is not None else (0, 1)
    quantize_on_load: dict[str, nn.Module] = {}
    presharded = read_tp_manifest(model_dir)
    if presharded is not None:
        if presharded["tp_size"] != world_size:
            raise CheckpointError(
                f"{model_dir!r} was split for tensor-parallel size {presharded['tp_size']} by "
                f"tools/merge_qkv_weight.py, but tensor-parallel size {world_size} was asked for; load it "
                f"with tp={presharded['tp_size']} or point at the original Hugging Face folder")
        ckpt = SafetensorsCheckpoint(os.path.join(model_dir, f"rank_{rank}"))
        params = dict(model.named_parameters())
        plan = {name: [name] for name in params
                if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
        pieces = {name: [(tuple(params[name].shape), None)] for name in plan}
    else:
        ckpt = SafetensorsCheckpoint(model_dir)
        plan = model.checkpoint_sources()  # our name -> [checkpoint names]
        params = dict(model.named_parameters())
        pieces = {name: _checkpoint_pieces(model, name, tuple(params[name].shape), len(sources))
                  for name, sources in plan.items()}
    # quantized layers whose checkpoint holds the float weight: read it, quantize on the way in
    quantize_on_load = _plan_quantize_on_load(model, plan, pieces, ckpt.names())

    # 1. validate names and shapes from the headers alone
    available = ckpt.names()
    used: set[str] = set()
    for name, sources in plan.items():
        for src, (shape, _) in zip(sources, pieces[name]):
            shape, src_name = tuple(shape), _source_name(src)
            if src_name not in available:
                raise CheckpointError(
                    f"checkpoint {model_dir!r} is missing tensor {src_name!r} (expected shape {list(shape)})"
                )
            found = ckpt.shape(src_name)
            if isinstance(src, CheckpointRows):  # rows start:stop of it are this piece
                if found[1:] != shape[1:] or src.stop - src.start != shape[0] or found[0] < src.stop:
                    raise CheckpointError(
                        f"tensor {src_name!r} in {model_dir!r} has shape {list(found)}; expected rows "
                        f"{src.start}:{src.stop} of shape {list(shape)} in it")
            elif found != shape:
                raise CheckpointError(
                    f"tensor {src_name!r} in {model_dir!r} has shape {list(found)}, expected {list(shape)}"
                )
            used.add(src_name)
    tied_head = "lm_head.weight" if model.config.tie_word_embeddings else None
    unexpected = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES) and n != tied_head)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint {model_dir!r} has tensors the {model.config.architecture} model does not use: "
            f"{unexpected[:5]}{more}"
        )

    # 2. read (this rank's part of each tensor), fuse and convert one tensor at a time
    state = {}
    for name, sources in plan.items():
        layer = quantize_on_load.get(name)
        if layer is not None:  # the float weight of a quantized layer, read in float32 and quantized below
            shape, param_dtype = layer.float_weight_shape(), torch.float32
        else:
            shape = params[name].shape
            param_dtype = dtype if params[name].is_floating_point() else params[name].dtype  # int8 / uint8 stay
        covered = sum(_part_rows(part, shape[0] if len(shape) else 1) for _, part in pieces[name])
        # rows no checkpoint tensor covers (vocab padding under tensor parallelism) stay zero
        out = (torch.empty if covered == (shape[0] if len(shape) else 1) else torch.zeros)(
            shape, dtype=param_dtype, device=device)
        row = 0
        for src, (piece_shape, part) in zip(sources, pieces[name]):
            rows = _part_rows(part, piece_shape[0] if len(piece_shape) else 1)
            ckpt.read_into(_source_name(src), out[row:row + rows], _rows_of_source(src, part))
            row += rows
        if check_finite and out.is_floating_point() and out.numel() and not _all_finite(out):
            _refuse_non_finite(name, out, [_source_name(src) for src in sources], model_dir)
        if layer is not None:
            layer_path = name.rpartition(".")[0]
            for leaf, value in layer.quantized_state(out).items():
                state[f"{layer_path}.{leaf}"] = value.to(dtype) if value.is_floating_point() else value
        else:
            state[name] = out
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen when the plan covers every parameter; guard the invariant
            raise CheckpointError(f"parameter {name!r} was not loaded")


def _all_finite(t: torch.Tensor) -> bool:
    """min and max propagate NaN and show +-inf: one fused pass at memory speed (27 GB/s for bf16
    here), where torch.isfinite(t).all() allocates a mask and ran 45x slower."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _refuse_non_finite(name: str, value: torch.Tensor, sources: list[str], model_dir: str) -> None:
    """NaN / inf in a weight would make every logit NaN, and greedy decoding then emits token 0
    forever: refuse the checkpoint instead, naming the tensor (checked as each one is read)."""
    bad = ~torch.isfinite(value)
    nan, inf = int(torch.isnan(value).sum()), int(bad.sum()) - int(torch.isnan(value).sum())
    raise CheckpointError(f"tensor {', '.join(map(repr, sources))} in {model_dir!r} (parameter {name!r}) holds "
                          f"non-finite values: {nan} NaN and {inf} inf of {value.numel()}; the checkpoint is "
                          "damaged or was saved in a dtype too narrow for its values")


TP_MANIFEST = "zoo-tp-manifest.json"
TP_FORMAT_VERSION = 1


def read_tp_manifest(model_dir: str) -> dict | None:
    """The manifest of a folder tools/merge_qkv_weight.py wrote, or None for a plain HF folder."""
    path = os.path.join(model_dir, TP_MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != TP_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                              f"{TP_FORMAT_VERSION}; re-run tools/merge_qkv_weight.py")
    for r in range(manifest["tp_size"]):
        if not os.path.isdir(os.path.join(model_dir, f"rank_{r}")):
            raise CheckpointError(f"{path} is for tp size {manifest['tp_size']}, but rank_{r}/ is missing")
    return manifest
