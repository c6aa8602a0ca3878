"""zoo.load(): checkpoint folder -> a Model ready to generate, eager or compiled."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence

import torch

from zoo.compile_config import CompileConfig, default_config_path, load_compile_config
from zoo.config import ModelConfig
from zoo.device import default_cache_dir, default_dtype, resolve_device
from zoo.engine import Engine, GenerationResult, Request, RequestError, StreamEvent, stream_events
from zoo.graph_cache import GraphCache, cache_key_fields
from zoo.graphs import Buckets, GraphRunner, compile_entry_points
from zoo.kv_cache import KVCache
from zoo.loader import load_weights
from zoo.parallel import SINGLE, TPContext, TPModel
from zoo.sampling import SamplingParams
from zoo.tokenizer import Tokenizer

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "embedded")
EMBEDDED_MODELS = {"llama": "tiny-llama", "qwen2": "tiny-qwen2"}

# family -> "module:Class" of its hand-adapted modeling file (imported on demand)
MODEL_CLASSES = {
    "llama": "zoo.llama.modeling_llama:LlamaForCausalLM",
    "qwen2": "zoo.qwen.modeling_qwen:Qwen2ForCausalLM",
    "qwen3": "zoo.qwen.modeling_qwen3:Qwen3ForCausalLM",
    "qwen": "zoo.qwen.modeling_qwen1:QWenLMHeadModel",  # first-generation Qwen (Qwen-7B-Chat)
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

Prompt = str | list[int]


def embedded_model_path(family: str = "llama") -> str:
    """Folder of the tiny model that ships inside the package for `family` (llama | qwen2)."""
    return os.path.join(EMBEDDED_DIR, EMBEDDED_MODELS[family])


def model_class(family: str):
    module, _, name = MODEL_CLASSES[family].partition(":")
    return getattr(importlib.import_module(module), name)


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def load(model_path: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
         compiled: bool | str = False, max_batch_size: int | None = None, max_seq_len: int | None = None,
         buckets: Buckets | None = None, compile_config: str | CompileConfig | None = None,
         inductor_options: dict | None = None, cache_dir: str | None = None, verbose: bool = False,
         tp: int | TPContext | None = None, use_mc2: bool = False,
         tp_timeout_s: float | None = None) -> "Model | TPModel":
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors [+ tokenizer files]).

    model_path None -> the embedded tiny Llama. compiled=True compiles prefill and decode per
    shape bucket as the compile config says (default: zoo/compile_configs/<family>.<device>.toml),
    each bucket on first use or all at once with Model.warmup(); compiled graphs are kept in the
    on-disk graph cache under cache_dir (default ~/.cache/zoo, or $ZOO_CACHE_DIR).
    compiled=DIR loads the AOTInductor graphs `python -m zoo.export` wrote to DIR: no tracing, no
    compiling; DIR also fixes the buckets, dtype, max_batch_size and max_seq_len.
    max_batch_size defaults to 8 and max_seq_len to min(max_position_embeddings, 2048); the KV
    cache holds max_batch_size slots of that length. buckets and inductor_options override the
    compile config's.

    tp=N (N > 1) runs the model tensor-parallel over N ranks in worker processes (spawned here;
    gloo on cpu) and returns a TPModel, a proxy with the same generate / stream / warmup API whose
    results come from rank 0 (docs/tensor_parallel.md). use_mc2 overlaps each row-parallel matmul
    with its all-reduce. A TPContext instead of an int loads this process's rank of an
    already-initialised process group (what each worker, or a torchrun rank, does).
    tp_timeout_s is the process-group timeout (default $ZOO_TP_TIMEOUT or 120 s): how long ranks
    wait in a collective for a peer that hangs before they fail.
    """
    t0 = time.perf_counter()
    model_path = model_path or embedded_model_path("llama")
    if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1:
        if isinstance(compiled, str):
            raise ValueError("tensor parallelism (tp > 1) does not run AOTInductor exports (compiled=DIR)")
        kwargs = dict(device=device, dtype=dtype, compiled=compiled, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, buckets=buckets, compile_config=compile_config,
                      inductor_options=inductor_options, cache_dir=cache_dir, verbose=verbose)
        ModelConfig.from_dir(model_path)  # a missing folder or bad config fails here, not in a worker
        return TPModel(model_path, tp, kwargs, use_mc2=use_mc2, timeout_s=tp_timeout_s)
    if tp is None or isinstance(tp, int):
        if tp is not None and (isinstance(tp, bool) or tp < 1):
            raise ValueError(f"tp must be an int >= 1, got {tp!r}")
        tp = SINGLE
    config = ModelConfig.from_dir(model_path)
    dev = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    exported = _read_export(compiled, max_batch_size, max_seq_len) if isinstance(compiled, str) else None
    if exported is not None:
        max_batch_size, max_seq_len = exported["cache"]["num_slots"], exported["cache"]["max_seq_len"]
        buckets = Buckets(tuple(exported["buckets"]["batch_sizes"]), tuple(exported["buckets"]["prefill_lens"]),
                          tuple(exported["buckets"].get("context_lens", ())))
        dtype = dtype or _DTYPES[exported["dtype"]]
    dtype = dtype or default_dtype(dev, config.torch_dtype)
    max_batch_size = 8 if max_batch_size is None else max_batch_size
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    max_seq_len = max_seq_len or min(config.max_position_embeddings, 2048, config.max_exact_seq_len or 2048)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if config.max_exact_seq_len is not None and max_seq_len > config.max_exact_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is longer than {config.max_exact_seq_len}, the context past which "
                         f"{config.source} switches on use_dynamic_ntk / use_logn_attn, which zoo does not implement; "
                         f"use max_seq_len <= {config.max_exact_seq_len}")
    if not isinstance(compile_config, CompileConfig):
        compile_config = load_compile_config(compile_config or default_config_path(config.family, dev.type))
    buckets = buckets or compile_config.buckets(max_batch_size, max_seq_len)
    buckets.validate(max_batch_size, max_seq_len)

    if tp.enabled and exported is not None:
        raise ValueError("tensor parallelism (tp > 1) does not run AOTInductor exports (compiled=DIR)")

    tokenizer = Tokenizer.from_dir(model_path)
    with torch.device("meta"):
        module = model_class(config.family)(config, tp)
    load_weights(module, model_path, dtype, dev)
    module.eval()
    cache = KVCache(config.num_layers, max_batch_size, module.num_local_kv_heads, max_seq_len, config.head_dim,
                    dtype, dev)
    if exported is not None:
        from zoo.aoti import ExportedGraphs

        graphs = ExportedGraphs.load(compiled, module, cache)  # checks dtype, config and cache geometry
        runner = GraphRunner(graphs.prefill, graphs.decode, cache, buckets, compiled=False,
                             description=f"AOTInductor graphs from {compiled}")
    elif compiled:
        runner = _compiled_runner(module, cache, buckets, compile_config, inductor_options, dtype, dev,
                                  cache_dir or default_cache_dir(), tp)
    else:
        runner = GraphRunner(module.prefill, module.decode, cache, buckets, compiled=False)
    eos = set(config.eos_token_ids) | _generation_config_eos(model_path)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = Engine(runner, cache, tokenizer, eos, max_seq_len, config.vocab_size)
    model = Model(config, module, tokenizer, engine, dev, dtype, model_path)
    if verbose:
        graphs = f"compiled: {runner.description}" if compiled else "eager"
        graphs = runner.description if exported is not None else graphs
        if runner.graph_cache is not None:
            graphs += f"; graph cache {runner.graph_cache.status} at {runner.graph_cache.dir}"
        tp_note = f", tensor-parallel rank {tp.rank} of {tp.world_size}" + (" (mc2)" if tp.use_mc2 else "") \
            if tp.enabled else ""
        _log(f"loaded {config.architecture} from {model_path} on {dev} ({dtype}){tp_note} in "
             f"{time.perf_counter() - t0:.1f} s: {model.num_parameters / 1e6:.1f} M parameters, KV cache "
             f"{cache.nbytes / 2**20:.1f} MiB ({max_batch_size} slots x {max_seq_len} tokens); {graphs}")
    return model


def _read_export(export_dir: str, max_batch_size: int | None, max_seq_len: int | None) -> dict:
    from zoo.aoti import read_manifest

    manifest = read_manifest(export_dir)
    for name, asked, exported in (("max_batch_size", max_batch_size, manifest["cache"]["num_slots"]),
                                  ("max_seq_len", max_seq_len, manifest["cache"]["max_seq_len"])):
        if asked is not None and asked != exported:
            raise ValueError(f"{name}={asked} was asked for, but the graphs in {export_dir!r} were exported "
                             f"for {name}={exported}")
    return manifest


def _compiled_runner(module, cache, buckets, compile_config: CompileConfig, inductor_overrides, dtype, device,
                     cache_dir: str, tp: TPContext = SINGLE) -> GraphRunner:
    backend = compile_config.backend
    if (backend == "torchair") != (device.type == "npu"):
        raise ValueError(f"{compile_config.source}: backend {backend!r} does not run on device {device.type!r} "
                         "(torchair is for npu, inductor for cpu/cuda)")
    if backend == "inductor":
        options = {**compile_config.inductor_options(dtype), **(inductor_overrides or {})}
        fingerprint = {"backend": "inductor", "options": options}
        description = f"inductor, options {options}"
    else:
        from zoo.backends import npu

        torch_npu, _ = npu.import_npu()
        options = compile_config.torchair
        module.set_attention_ops(npu.NpuAttentionOps(torch_npu))  # fused FA / IFA and scatter_update_
        fingerprint = {"backend": "torchair", "options": options, "torch_npu": torch_npu.__version__}
        description = f"torchair, options {options}"
    if tp.enabled:
        fingerprint["tp"] = tp.fingerprint()  # each rank compiles (and caches) its own shard's graphs
        fingerprint["tp_source"] = _tp_source_hash()  # the collectives' code lives outside zoo.layers
    graph_cache = None
    if compile_config.graph_cache:
        fields = cache_key_fields(module, fingerprint, dtype, buckets, tuple(cache.k[0].shape), device)
        graph_cache = GraphCache(cache_dir, fields)
    if backend == "torchair" and graph_cache is not None:
        # torchair.inference.cache_compile keeps its own files, inside zoo's keyed directory
        prefill, decode = npu.cache_compiled_methods(module, options, os.path.join(graph_cache.dir, "torchair"))
    else:
        prefill, decode = compile_entry_points(module, backend, options, buckets)
    return GraphRunner(prefill, decode, cache, buckets, True, description, graph_cache)


def _tp_source_hash() -> str:
    import hashlib

    import zoo.parallel

    with open(zoo.parallel.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _generation_config_eos(model_path: str) -> set[int]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())


class Model:
    """A loaded model: generate(), stream(), warmup(). Safe to share between threads (requests
    from different callers are batched together by the engine)."""

    def __init__(self, config: ModelConfig, module: torch.nn.Module, tokenizer: Tokenizer | None,
                 engine: Engine, device: torch.device, dtype: torch.dtype, path: str):
        self.config, self.module, self.tokenizer, self.engine = config, module, tokenizer, engine
        self.device, self.dtype, self.path = device, dtype, path

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.module.parameters()}.values())

    @property
    def compile_seconds(self) -> float:
        return self.engine.runner.compile_seconds

    @property
    def buckets(self) -> Buckets:
        return self.engine.runner.buckets

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def warmup(self, batch_sizes: Sequence[int] | None = None, prompt_lens: Sequence[int] | None = None,
               context_lens: Sequence[int] | None = None) -> None:
        """Build the graphs for these buckets now (default: all; context_lens are the decode context
        buckets, see zoo.graphs.Buckets). After this, generating inside them compiles nothing."""
        with self.engine.lock:
            self.engine.runner.warmup(batch_sizes, prompt_lens, context_lens=context_lens)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False) -> list[GenerationResult] | GenerationResult:
        """Generate for one prompt (a string or a list of token ids) or a list of them.

        Returns one GenerationResult per prompt (a single one for a single prompt). More prompts
        than max_batch_size are queued and run as slots free up (continuous batching)."""
        single = _is_single_prompt(prompts)
        requests = self._requests(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                  stop_token_ids, ignore_eos)
        for _ in self._run(requests):
            pass
        results = [r.result() for r in requests]
        failed = [r for r in results if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"generation failed: {failed[0].error}")
        return results[0] if single else results

    def stream(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False) -> "Stream":
        """Like generate(), but yields StreamEvent(index, text, token_ids, finish_reason) pieces as
        they are produced. Closing the iterator early aborts its unfinished requests; once it is
        exhausted, `.results` holds the GenerationResults."""
        requests = self._requests(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                  stop_token_ids, ignore_eos)
        return Stream(self._run(requests), requests)

    def _requests(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids,
                  ignore_eos) -> list[Request]:
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        if not prompt_list:
            raise RequestError("no prompts given")
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                                top_p=top_p, seed=seed, stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
                                stop_token_ids=tuple(stop_token_ids or ()), ignore_eos=ignore_eos)
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        return [self.engine.make_request(i, self._encode(p, i), params, p if isinstance(p, str) else None)
                for i, p in enumerate(prompt_list)]

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.path!r} has no tokenizer files; pass prompts as lists of token ids")
            if not prompt:
                raise RequestError(f"prompt {index} is empty: at least one token is needed")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise RequestError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")

    def _run(self, requests: list[Request]) -> Iterator[StreamEvent]:
        self.engine.submit(requests)
        yield from stream_events(requests, self.engine.step, self.engine.abort)


class Stream:
    """Iterator of StreamEvents for one stream() call."""

    def __init__(self, events: Iterator[StreamEvent], requests: list[Request]):
        self._events, self.requests = events, requests

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    @property
    def results(self) -> list[GenerationResult]:
        return [r.result() for r in self.requests]


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts))
