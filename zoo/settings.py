"""LoadSettings: every option of zoo.load, its default, its validation and its command-line form.

One dataclass owns the options: zoo.load(**options) builds it, and every CLI (generate, serve, pd,
export) derives its model options from the `cli` metadata of its fields
(zoo.entrypoints.options.add_model_options), so a new option is added here once. Importing this
module does not import torch: the CLIs parse and check their options before a model loads.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zoo.config import DTYPE_ALIASES, DTYPE_NAMES, INT4_GROUP_SIZES, QUANT_MODES

if TYPE_CHECKING:  # torch and what needs it are imported when a model is loaded, not to parse options
    import torch

    from zoo.distributed.comm import TPContext
    from zoo.graphs.buckets import Buckets
    from zoo.graphs.compile_config import CompileConfig


def _cli(*flags: str, **argparse_kwargs) -> dict:
    """Field metadata: how the option is spelled on the command line (argparse add_argument kwargs)."""
    return {"cli": (flags, argparse_kwargs)}


@dataclass(frozen=True)
class LoadSettings:
    model_path: str | None = field(default=None, metadata=_cli(
        "--model-path", help="Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer files "
                             "(default: the embedded tiny model)"))
    device: str = field(default="cpu", metadata=_cli("--device", help="cpu | cuda[:N] | npu[:N] (default cpu)"))
    dtype: str | torch.dtype | None = field(default=None, metadata=_cli(
        "--dtype", choices=DTYPE_NAMES, help="weights and KV cache dtype (default: the checkpoint's; float16 "
                                               "becomes bfloat16 on cpu)"))
    quantize: str | None = field(default=None, metadata=_cli(
        "--quantize", choices=QUANT_MODES,
        help="weight-only quantization of the linear layers while loading a float checkpoint: int8 (one scale per "
             "output channel) or int4 (a scale and offset per group of input columns); the LM head becomes int8. "
             "A checkpoint written by python -m zoo.quantize is loaded as it is, without this option"))
    quantize_group_size: int | None = field(default=None, metadata=_cli(
        "--quantize-group-size", type=int, choices=INT4_GROUP_SIZES,
        help="with --quantize int4: input columns per scale (default 64)"))
    compiled: bool | str = field(default=False, metadata=_cli(
        "--compiled", nargs="?", const=True, metavar="EXPORT_DIR",
        help="run prefill/decode as compiled graphs: torch.compile'd per shape bucket (cached on disk), or, given "
             "EXPORT_DIR, the AOTInductor graphs `python -m zoo.export` wrote there"))
    compile_in_background: bool = field(default=False, metadata=_cli(
        "--compile-in-background", action="store_true",
        help="with --compiled (torch.compile): build every bucket's graph in a background thread and run a "
             "bucket eagerly until its graph is ready, so requests are answered from the start (python -m "
             "zoo.serve --compiled does this unless --warmup is given)"))
    max_batch_size: int | None = field(default=None, metadata=_cli(
        "--max-batch-size", type=int, help="decode batch rows = most requests running at once (default 8, or "
                                           "the export's)"))
    kv_cache_tokens: int | None = field(default=None, metadata=_cli(
        "--kv-cache-tokens", type=int, metavar="N",
        help="KV-cache pool size in tokens, shared by all running requests in blocks (default: max_batch_size x "
             "max_seq_len, at most half the free memory)"))
    prefill_tokens: int | None = field(default=None, metadata=_cli(
        "--prefill-tokens", type=int, metavar="N",
        help="most prompt tokens one prefill call computes (batch x padded length; default: the compile config's, "
             "2048 on cpu). A longer prompt is prefilled in chunks of up to N tokens (with dynamic lengths a multiple of "
             "their length_multiple, 32 on cpu), each in one forward with the "
             "decode step of the running requests (dynamic-length graphs), so a long prompt does not stall them; "
             "smaller N keeps their time per token steadier and makes the long prompt's first token later"))
    max_seq_len: int | None = field(default=None, metadata=_cli(
        "--max-seq-len", type=int, help="tokens per request, prompt + completion (default: "
                                        "min(max_position_embeddings, 2048))"))
    buckets: Buckets | None = None  # Python API only: overrides the compile config's shape buckets
    compile_config: str | CompileConfig | None = field(default=None, metadata=_cli(
        "--compile-config", metavar="FILE", help="compile config TOML (default: zoo/graphs/configs/"
                                                 "<model>.<device>.toml)"))
    inductor_options: dict | None = field(default=None, metadata=_cli(
        "--inductor-option", action="append", metavar="KEY=VALUE",
        help="override an inductor option, e.g. cpp_wrapper=false (repeatable)"))
    cache_dir: str | None = field(default=None, metadata=_cli(
        "--cache-dir", help="graph cache root (default: ~/.cache/zoo or $ZOO_CACHE_DIR)"))
    threads: int | None = field(default=None, metadata=_cli(
        "--threads", type=int, metavar="N",
        help="torch CPU threads per process (per rank with --tp; default: all cores, or cores / N ranks). On a "
             "machine other busy processes share, fewer threads than cores keeps OpenMP threads from waiting on "
             "each other (decode can slow 10x when they oversubscribe)"))
    tp: int | TPContext | None = field(default=None, metadata=_cli(
        "--tp", type=int, metavar="N",
        help="tensor-parallel size: N rank processes started here (under torchrun, its WORLD_SIZE)"))
    use_mc2: bool = field(default=False, metadata=_cli(
        "--use-mc2", action="store_true",
        help="overlap each row-parallel matmul with its all-reduce (chunked; npu_mm_all_reduce_base on npu)"))
    tp_timeout_s: float | None = field(default=None, metadata=_cli(
        "--tp-timeout", type=float, metavar="SECONDS",
        help="how long ranks wait in a collective for a peer that hangs (default $ZOO_TP_TIMEOUT or 120)"))
    check_weights: bool = field(default=True, metadata=_cli(
        "--skip-weight-check", action="store_false",
        help="do not scan the weights for NaN / inf while loading (the scan costs ~0.13 s per 2 GB here; "
             "benches/results/weight_check_cost-*.md)"))
    verbose: bool = False  # one summary line on stderr once loaded (the CLIs turn it on)

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        if self.tp is None or isinstance(self.tp, int):
            return self.tp or 1
        return self.tp.world_size  # a TPContext

    @property
    def spawns_ranks(self) -> bool:
        """tp=N > 1 as an int: zoo.load starts N rank processes and returns a proxy."""
        return isinstance(self.tp, int) and self.tp > 1

    @property
    def exported(self) -> bool:
        return isinstance(self.compiled, str)

    def validated(self) -> "LoadSettings":
        """Checks every option that can be checked before touching a file; ValueError naming it."""
        def positive_int(name, allow_none=True):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        for name in ("max_batch_size", "threads", "kv_cache_tokens", "prefill_tokens"):
            positive_int(name)
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int)
                                             or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2, got {self.max_seq_len!r}")
        if self.tp is None or isinstance(self.tp, int):  # else a TPContext
            positive_int("tp")
        if isinstance(self.dtype, str) and self.dtype.removeprefix("torch.") not in (*DTYPE_NAMES, *DTYPE_ALIASES):
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
        if self.quantize is not None and self.quantize not in QUANT_MODES:
            raise ValueError(f"unknown quantize {self.quantize!r}; use one of {', '.join(QUANT_MODES)}")
        if self.quantize_group_size is not None and self.quantize != "int4":
            raise ValueError(f"quantize_group_size goes with int4 quantization, not quantize={self.quantize!r}")
        if self.quantize_group_size is not None and self.quantize_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantize_group_size must be one of {list(INT4_GROUP_SIZES)}, "
                             f"got {self.quantize_group_size!r}")
        if not isinstance(self.compiled, (bool, str)):
            raise ValueError(f"compiled must be True, False or an export folder, got {self.compiled!r}")
        if self.compile_in_background and self.compiled is not True:
            raise ValueError("compile_in_background needs compiled=True (torch.compile); an export is loaded whole")
        if self.compile_in_background and self.tp_size > 1:
            raise ValueError("compile_in_background does not run with tensor parallelism (tp > 1): every rank "
                             "must run the same graphs at each step")
        if self.tp_size > 1 and self.exported:
            raise ValueError("tensor parallelism (tp > 1) does not run AOTInductor exports (compiled=DIR)")
        if self.prefill_tokens is not None and self.exported:
            raise ValueError(f"prefill_tokens cannot change the graphs exported to {self.compiled!r} (their prefill "
                             "shapes are fixed); set it in the compile config's [buckets] when exporting")
        if self.tp_timeout_s is not None and not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be > 0, got {self.tp_timeout_s!r}")
        if self.model_path is not None and not isinstance(self.model_path, (str, os.PathLike)):
            raise ValueError(f"model_path must be a folder path, got {type(self.model_path).__name__}")
        return self

    def replace(self, **changes) -> "LoadSettings":
        return dataclasses.replace(self, **changes)


CLI_FIELDS = tuple(f for f in dataclasses.fields(LoadSettings) if "cli" in f.metadata)
