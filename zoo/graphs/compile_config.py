"""Compile configs: how a model family is compiled on a device, as a validated TOML file.

One file per model family x device ships in zoo/graphs/configs/ (llama.cpu.toml, qwen.cuda.toml, ...;
the model registry names each architecture's file stem);
`zoo.load(compile_config=FILE)` / `--compile-config FILE` use another. The format:

    backend = "inductor"            # inductor (cpu, cuda) | torchair (npu)
    mode = "default"                # inductor: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    graph_cache = true              # keep compiled graphs on disk (zoo.graphs.cache)
    regional = false                # inductor: trace and compile one decoder layer per bucket, reused for
                                    # every layer (torch.compiler.nested_compile_region): compile time
                                    # independent of depth. Not with cpp_wrapper (inductor has no C++
                                    # wrapper code for nested regions in torch 2.13)
    kv_block_size = 32              # positions per block of the paged KV cache (zoo.graphs.kv_cache)

    [buckets]                       # optional; cut at / extended to max_batch_size and max_seq_len
    batch_sizes = [1, 2, 4, 8]
    prefill_lens = [32, 64, 128, 256, 512, 1024, 2048]
    context_lens = [256, 512, 1024, 2048]   # decode attends over the first L positions; omit = all
    prefill_tokens = 2048           # most padded tokens (batch x length) one prefill call runs; larger
                                    # groups are split, longer prompts prefilled in chunks
    # or, instead of prefill_lens / context_lens (inductor, not with CUDA graphs):
    dynamic_lengths = true          # one prefill and one decode graph per batch size, the prompt length
                                    # and decode context a dynamic dimension (zoo.graphs.buckets)
    length_multiple = 32            # dynamic lengths are padded up to a multiple of this

    [inductor]                      # torch._inductor.config options, for every dtype
    cpp_wrapper = true
    [inductor.bfloat16]             # merged on top when the model runs in bfloat16 (or float16 / float32)
    freezing = true

    [torchair]                      # backend = "torchair": options in zoo.backends.npu.TORCHAIR_OPTIONS, docs/npu.md
    mode = "max-autotune"
    frozen_parameter = true

Any unknown key or wrong value raises CompileConfigError naming the key and the file.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field

import torch

from zoo.errors import CompileConfigError
from zoo.backends.npu import validate_options as validate_torchair_options
from zoo.config import DTYPE_NAMES
from zoo.device import parse_dtype
from zoo.graphs.buckets import Buckets

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
BACKENDS = ("inductor", "torchair")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BUCKET_SCALARS = {"prefill_tokens": int, "dynamic_lengths": bool, "length_multiple": int}
_TOP_LEVEL = {"backend", "mode", "graph_cache", "regional", "kv_block_size", "buckets", "inductor", "torchair"}


@dataclass(frozen=True)
class CompileConfig:
    source: str
    backend: str = "inductor"
    mode: str = "default"
    graph_cache: bool = True
    regional: bool = False  # one compiled decoder layer reused for every layer (see the module docstring)
    batch_sizes: tuple[int, ...] | None = None
    prefill_lens: tuple[int, ...] | None = None
    context_lens: tuple[int, ...] | None = None
    prefill_tokens: int | None = None
    dynamic_lengths: bool = False
    length_multiple: int = 32
    inductor: dict = field(default_factory=dict)  # for every dtype
    inductor_by_dtype: dict = field(default_factory=dict)  # dtype name -> options on top
    torchair: dict = field(default_factory=dict)
    kv_block_size: int = 32

    def inductor_options(self, dtype: torch.dtype) -> dict:
        """What torch.compile(options=...) gets: the mode's options, then ours, then the dtype's."""
        options = {} if self.mode == "default" else dict(torch._inductor.list_mode_options(self.mode))
        options.update(self.inductor)
        for name in DTYPE_NAMES:
            if parse_dtype(name) == dtype:
                options.update(self.inductor_by_dtype.get(name, {}))
        return options

    def buckets(self, max_batch_size: int, max_seq_len: int) -> Buckets:
        default = Buckets.default(max_batch_size, max_seq_len)
        batch_sizes = _fit(self.batch_sizes, max_batch_size) or default.batch_sizes
        if self.dynamic_lengths:
            # a short max_seq_len gets a smaller multiple (a dynamic range needs two of them)
            multiple = max(2, min(self.length_multiple, max_seq_len // 2))
            return Buckets.dynamic(batch_sizes, max_seq_len, multiple, self.prefill_tokens)
        return Buckets(batch_sizes, _fit(self.prefill_lens, max_seq_len) or default.prefill_lens,
                       _fit(self.context_lens, max_seq_len) or (), prefill_tokens=self.prefill_tokens)


def _fit(sizes: tuple[int, ...] | None, limit: int) -> tuple[int, ...] | None:
    """Bucket sizes below `limit`, then `limit` itself: buckets must reach the configured maximum."""
    if sizes is None:
        return None
    return tuple([s for s in sizes if s < limit] + [limit])


def default_config_path(stem: str, device_type: str) -> str:
    """The shipped config for a model's file stem (zoo.models.ModelSpec.compile_config) on a device."""
    return os.path.join(CONFIG_DIR, f"{stem}.{device_type}.toml")


def load_compile_config(path: str) -> CompileConfig:
    if not os.path.isfile(path):
        raise CompileConfigError(f"compile config not found: {path!r}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise CompileConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_compile_config(raw, path)


def parse_compile_config(raw: dict, source: str) -> CompileConfig:
    def fail(key: str, problem: str):
        raise CompileConfigError(f"{source}: key {key!r} {problem}")

    for key in raw:
        if key not in _TOP_LEVEL:
            fail(key, f"is not a compile-config key (known: {', '.join(sorted(_TOP_LEVEL))})")
    backend = raw.get("backend", "inductor")
    if backend not in BACKENDS:
        fail("backend", f"must be one of {BACKENDS}, got {backend!r}")
    mode = raw.get("mode", "default")
    if backend == "inductor" and mode not in INDUCTOR_MODES:
        fail("mode", f"must be one of {INDUCTOR_MODES} for the inductor backend, got {mode!r}")
    graph_cache = raw.get("graph_cache", True)
    if not isinstance(graph_cache, bool):
        fail("graph_cache", f"must be true or false, got {graph_cache!r}")
    regional = raw.get("regional", False)
    if not isinstance(regional, bool):
        fail("regional", f"must be true or false, got {regional!r}")
    if regional and backend != "inductor":
        fail("regional", "is an inductor option (torchair compiles the whole graph)")

    kv_block_size = raw.get("kv_block_size", 32)
    if type(kv_block_size) is not int or kv_block_size < 1:
        fail("kv_block_size", f"must be a positive int, got {kv_block_size!r}")

    buckets = raw.get("buckets", {})
    if not isinstance(buckets, dict):
        fail("buckets", "must be a table")
    sizes, scalars = {}, {}
    for key, values in buckets.items():
        if key in _BUCKET_SCALARS:
            kind = _BUCKET_SCALARS[key]
            if type(values) is not kind or (kind is int and values < 1):
                fail(f"buckets.{key}", f"must be {'true or false' if kind is bool else 'a positive int'}, "
                                       f"got {values!r}")
            scalars[key] = values
            continue
        if key not in ("batch_sizes", "prefill_lens", "context_lens"):
            fail(f"buckets.{key}", "is not a bucket key (known: batch_sizes, prefill_lens, context_lens, "
                                   f"{', '.join(_BUCKET_SCALARS)})")
        if (not isinstance(values, list) or not values or any(type(v) is not int or v < 1 for v in values)
                or values != sorted(set(values))):
            fail(f"buckets.{key}", f"must be a non-empty increasing list of positive ints, got {values!r}")
        sizes[key] = tuple(values)

    if backend == "torchair" and "context_lens" in sizes:
        # torchair's cached decode functions take no context length (and IFA on a sliced cache view
        # has not run on hardware): Ascend decode attends over the whole cache
        fail("buckets.context_lens", "is not supported by the torchair backend")
    dynamic = scalars.get("dynamic_lengths", False)
    if dynamic:
        for key in ("prefill_lens", "context_lens"):
            if key in sizes:
                fail(f"buckets.{key}", "cannot be combined with dynamic_lengths = true (every length up to "
                                       "max_seq_len has its graph)")
        if backend != "inductor":
            fail("buckets.dynamic_lengths", "is an inductor option (torchair graphs are static-shaped)")
        if mode in ("reduce-overhead", "max-autotune"):
            fail("buckets.dynamic_lengths", f"cannot be combined with mode {mode!r}: CUDA graphs record one "
                                            "graph per distinct length; use static length buckets")
    elif "length_multiple" in scalars:
        fail("buckets.length_multiple", "needs dynamic_lengths = true")
    inductor, by_dtype = _parse_inductor(raw.get("inductor", {}), fail)
    if regional and any(options.get("cpp_wrapper") for options in [inductor, *by_dtype.values()]):
        fail("regional", "cannot be combined with [inductor] cpp_wrapper = true: inductor's C++ wrapper "
                         "has no code for nested compile regions (torch 2.13); drop one of them")
    torchair = raw.get("torchair", {})
    if not isinstance(torchair, dict):
        fail("torchair", "must be a table")
    try:
        torchair = validate_torchair_options(torchair)  # one option table, shared with the NPU backend
    except ValueError as e:
        raise CompileConfigError(f"{source}: [torchair] {e}") from None

    return CompileConfig(source, backend, mode, graph_cache, regional, sizes.get("batch_sizes"),
                         sizes.get("prefill_lens"), sizes.get("context_lens"), scalars.get("prefill_tokens"),
                         dynamic, scalars.get("length_multiple", 32), inductor, by_dtype, torchair, kv_block_size)


def _parse_inductor(table, fail) -> tuple[dict, dict]:
    if not isinstance(table, dict):
        fail("inductor", "must be a table")
    known = set(torch._inductor.list_options())
    common, by_dtype = {}, {}
    for key, value in table.items():
        if key in DTYPE_NAMES:
            if not isinstance(value, dict):
                fail(f"inductor.{key}", "must be a table of inductor options")
            for sub, sub_value in value.items():
                _check_inductor_option(f"inductor.{key}.{sub}", sub, sub_value, known, fail)
            by_dtype[key] = dict(value)
        else:
            _check_inductor_option(f"inductor.{key}", key, value, known, fail)
            common[key] = value
    return common, by_dtype


def check_inductor_overrides(options: dict | None) -> None:
    """zoo.load(inductor_options=...) / --inductor-option: each key a real inductor option, with a
    value of the option's kind; CompileConfigError naming the key (and the close matches)."""
    def fail(key: str, problem: str):
        raise CompileConfigError(f"inductor option {key!r} (--inductor-option / inductor_options) {problem}")

    known = set(torch._inductor.list_options())
    for key, value in (options or {}).items():
        _check_inductor_option(key, key, value, known, fail)


def _check_inductor_option(path: str, key: str, value, known: set, fail) -> None:
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.7)
        fail(path, "is not a torch._inductor.config option" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    current = getattr(torch._inductor.config, key, None) if "." not in key else None
    if isinstance(current, bool) and not isinstance(value, bool):
        fail(path, f"must be true or false, got {value!r}")
