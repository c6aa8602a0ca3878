"""zoo.load(): checkpoint folder -> a Model ready to generate, eager or compiled.

Loading is a few named steps over one LoadSettings (zoo.settings):
  settings -> config -> tokenizer -> module -> weights -> cache -> runner -> engine
With tp=N (N > 1) the same steps run in N rank processes (zoo.distributed.launch), and the caller
gets a TPModel: a proxy that forwards every Model attribute and method to the ranks by name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from zoo.config import DEFAULT_INT4_GROUP_SIZE, ModelConfig, Quantization
from zoo.device import default_cache_dir, default_dtype, free_memory_bytes, parse_dtype, resolve_device
from zoo.distributed.comm import SINGLE, TPContext
from zoo.engine import Engine, GenerationResult, Request, SamplingParams, StreamEvent, encode_prompt, stream_events
from zoo.engine.driver import EngineDriver
from zoo.engine.choices import check_choices, keep_best, sample_params
from zoo.errors import ConfigError, RequestError
from zoo.graphs import Buckets, GraphRunner, KVCache, build_runner
from zoo.graphs.compile_config import (CompileConfig, check_inductor_overrides, default_config_path,
                                       load_compile_config)
from zoo.layers.linear import pack_quantized_layers, quantize_linear_layers
from zoo.loader import load_weights
from zoo.log import log
from zoo.models import ModelSpec, embedded_model_path, read_config, spec_for
from zoo.settings import LoadSettings
from zoo.tokenizers import Tokenizer, load_tokenizer

Prompt = str | list[int]


def load(model_path: str | None = None, **options) -> "Model | TPModel":
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors [+ tokenizer files]).

    model_path None -> the embedded tiny Llama. The options are the fields of
    zoo.settings.LoadSettings (device, dtype, compiled, max_batch_size, max_seq_len, buckets,
    compile_config, inductor_options, cache_dir, threads, tp, use_mc2, tp_timeout_s, check_weights,
    verbose); an unknown one is a TypeError naming it.

    compiled=True compiles prefill and decode per shape bucket as the compile config says
    (default: zoo/graphs/configs/<model>.<device>.toml), each bucket on first use or all at once
    with Model.warmup(); compiled graphs are kept in the on-disk graph cache under cache_dir
    (default ~/.cache/zoo, or $ZOO_CACHE_DIR). compiled=DIR loads the AOTInductor graphs
    `python -m zoo.export` wrote to DIR: no tracing, no compiling; DIR also fixes the buckets,
    dtype, max_batch_size and max_seq_len. max_batch_size defaults to 8 and max_seq_len to
    min(max_position_embeddings, 2048); the KV cache holds max_batch_size slots of that length.

    tp=N (N > 1) runs the model tensor-parallel over N ranks in worker processes (gloo on cpu) and
    returns a TPModel with the same API, whose results come from rank 0 (docs/tensor_parallel.md).
    The calling script needs an `if __name__ == "__main__":` guard, as with any spawned process.
    A TPContext instead of an int loads this process's rank of an already-initialised process
    group (what each rank, or a torchrun rank, does).
    """
    return load_from(LoadSettings(model_path=model_path, **options))


def load_from(settings: LoadSettings) -> "Model | TPModel":
    """zoo.load with the options already gathered in a LoadSettings (what the CLIs build)."""
    settings = settings.validated()
    settings = settings.replace(model_path=settings.model_path or embedded_model_path("llama"))
    if settings.spawns_ranks:
        return TPModel(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return load_rank(settings, settings.tp if isinstance(settings.tp, TPContext) else SINGLE)


@dataclass(frozen=True)
class _Plan:
    """What the settings resolve to for one checkpoint: sizes, dtype, buckets, compile config."""

    device: torch.device
    dtype: torch.dtype
    max_batch_size: int
    max_seq_len: int
    buckets: Buckets
    compile_config: CompileConfig
    kv_cache_tokens: int | None  # None: the default (_kv_cache_tokens)
    kv_block_size: int


def load_rank(settings: LoadSettings, tp: TPContext) -> "Model":
    """The load steps in this process (one rank's shard under tensor parallelism)."""
    t0 = time.perf_counter()
    path = settings.model_path
    config = _with_quantization(read_config(path), settings)
    spec = spec_for(config)
    plan = _plan(settings, config, spec)
    tokenizer = load_tokenizer(path)
    module = _build_module(spec, config, tp)
    load_weights(module, path, plan.dtype, plan.device, check_finite=settings.check_weights)
    pack_quantized_layers(module, plan.dtype, settings.cache_dir or default_cache_dir())  # int4: the CPU kernel's layout
    module.eval()
    cache = KVCache(config.num_layers, plan.max_batch_size, module.num_local_kv_heads, plan.max_seq_len,
                    config.head_dim, plan.dtype, plan.device, block_size=plan.kv_block_size,
                    num_tokens=_kv_cache_tokens(settings, plan, config, module.num_local_kv_heads, tp))
    runner = build_runner(module, cache, plan.buckets, spec=spec, compiled=settings.compiled,
                          compile_config=plan.compile_config, inductor_options=settings.inductor_options,
                          dtype=plan.dtype, device=plan.device, cache_dir=settings.cache_dir or default_cache_dir(),
                          tp=tp)
    runner.log_compiles = tp.rank == 0  # one log line per compile, not one per rank
    if settings.compile_in_background:
        runner.compile_in_background()  # buckets run eagerly until their graph is ready
    engine = Engine(runner, cache, tokenizer, _eos_token_ids(config, tokenizer, path), plan.max_seq_len,
                    config.vocab_size)
    model = Model(config, module, tokenizer, engine, plan.device, plan.dtype, path)
    if settings.verbose and tp.rank == 0:
        _log_loaded(model, runner, tp, time.perf_counter() - t0)
    return model


def _plan(settings: LoadSettings, config: ModelConfig, spec: ModelSpec) -> _Plan:
    device = resolve_device(settings.device)
    dtype = parse_dtype(settings.dtype) if settings.dtype is not None else None
    max_batch_size, max_seq_len, buckets = settings.max_batch_size, settings.max_seq_len, settings.buckets
    kv_cache_tokens, kv_block_size = settings.kv_cache_tokens, None
    if settings.exported:  # the export fixes sizes, buckets and (unless asked) dtype
        max_batch_size, max_seq_len, kv_cache_tokens, kv_block_size, buckets, exported_dtype = \
            _exported_shapes(settings)
        dtype = dtype or exported_dtype
    dtype = dtype or default_dtype(device, config.torch_dtype)
    max_batch_size = max_batch_size or 8
    max_seq_len = max_seq_len or min(config.max_position_embeddings, 2048, config.max_exact_seq_len or 2048)
    if config.max_exact_seq_len is not None and max_seq_len > config.max_exact_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is longer than {config.max_exact_seq_len}, the context past which "
                         f"{config.source} switches on use_dynamic_ntk / use_logn_attn, which zoo does not implement; "
                         f"use max_seq_len <= {config.max_exact_seq_len}")
    compile_config = settings.compile_config
    if not isinstance(compile_config, CompileConfig):
        compile_config = load_compile_config(compile_config or default_config_path(spec.compile_config, device.type))
    if settings.compiled is True and compile_config.backend == "inductor":
        check_inductor_overrides(settings.inductor_options)  # before anything loads
    buckets = buckets or compile_config.buckets(max_batch_size, max_seq_len)
    if settings.prefill_tokens is not None:  # (not with an export: LoadSettings.validated)
        buckets = dataclasses.replace(buckets, prefill_tokens=settings.prefill_tokens)
    buckets.validate(max_batch_size, max_seq_len)
    return _Plan(device, dtype, max_batch_size, max_seq_len, buckets, compile_config, kv_cache_tokens,
                 kv_block_size or compile_config.kv_block_size)


def _kv_cache_tokens(settings: LoadSettings, plan: _Plan, config: ModelConfig, kv_heads: int,
                     tp: TPContext) -> int:
    """The KV pool's size in tokens: as asked (or exported), else what max_batch_size whole
    sequences take, capped at half the free memory (never below one whole sequence). Tensor-parallel
    ranks skip the cap: their engines schedule alike only with pools of one size."""
    if plan.kv_cache_tokens is not None:
        return plan.kv_cache_tokens
    tokens = plan.max_batch_size * plan.max_seq_len
    free = None if tp.enabled else free_memory_bytes(plan.device)
    if free is not None:
        per_token = 2 * config.num_layers * kv_heads * config.head_dim * plan.dtype.itemsize
        tokens = min(tokens, free // 2 // per_token)
    return max(tokens, plan.max_seq_len)


def _exported_shapes(settings: LoadSettings) -> tuple[int, int, int, int, Buckets, torch.dtype]:
    from zoo.graphs.aoti import read_manifest

    manifest = read_manifest(settings.compiled)
    cache = manifest["cache"]
    for name, asked, exported in (("max_batch_size", settings.max_batch_size, cache["num_slots"]),
                                  ("max_seq_len", settings.max_seq_len, cache["max_seq_len"]),
                                  ("kv_cache_tokens", settings.kv_cache_tokens, cache["num_tokens"])):
        if asked is not None and asked != exported:
            raise ValueError(f"{name}={asked} was asked for, but the graphs in {settings.compiled!r} were exported "
                             f"for {name}={exported}")
    b = manifest["buckets"]
    buckets = Buckets(tuple(b["batch_sizes"]), tuple(b["prefill_lens"]), tuple(b.get("context_lens", ())),
                      prefill_tokens=b.get("prefill_tokens"))
    return (cache["num_slots"], cache["max_seq_len"], cache["num_tokens"], cache["block_size"], buckets,
            parse_dtype(manifest["dtype"]))


def _with_quantization(config: ModelConfig, settings: LoadSettings) -> ModelConfig:
    """The config with the quantization the model runs with: the checkpoint's own (python -m
    zoo.quantize), the export's, or settings.quantize applied to a float checkpoint while loading."""
    asked = settings.quantize
    if asked is None and settings.exported:
        from zoo.graphs.aoti import read_manifest

        exported = read_manifest(settings.compiled).get("quantization")
        return config if exported is None else dataclasses.replace(config, quantization=Quantization.from_hf(
            exported, settings.compiled))
    if asked is None:
        return config
    group_size = settings.quantize_group_size or DEFAULT_INT4_GROUP_SIZE
    have = config.quantization
    if have is not None:
        if have.mode != asked or (settings.quantize_group_size and have.group_size != group_size):
            raise ConfigError(f"{config.source}: the checkpoint is already quantized ({have.describe()}); load it "
                              f"without --quantize, or quantize the float checkpoint to {asked}")
        return config
    lm_head = None if config.tie_word_embeddings else "int8"  # a tied head is the embedding table: stays float
    return dataclasses.replace(config, quantization=Quantization(asked, group_size, lm_head))


def _build_module(spec: ModelSpec, config: ModelConfig, tp: TPContext) -> torch.nn.Module:
    """The model's modules on the meta device: no memory until load_weights fills each parameter.
    Quantized models hold their linears' stored quantized tensors in place of the float weights."""
    with torch.device("meta"):
        module = spec.model_class(config, tp)
    q = config.quantization
    if q is not None:
        quantize_linear_layers(module, q.mode, q.group_size, q.lm_head)
    return module


def _eos_token_ids(config: ModelConfig, tokenizer: Tokenizer | None, model_path: str) -> set[int]:
    eos = set(config.eos_token_ids) | _generation_config_eos(model_path)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


def _generation_config_eos(model_path: str) -> set[int]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    eos = raw.get("eos_token_id")
    if eos is None:
        return set()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ConfigError(f"{path}: field 'eos_token_id' must be a token id or a list of them, got {eos!r}")
    return set(ids)


def _log_loaded(model: "Model", runner: GraphRunner, tp: TPContext, seconds: float) -> None:
    graphs = f"compiled: {runner.description}" if runner.compiled else runner.description
    if runner.graph_cache is not None:
        graphs += f"; graph cache {runner.graph_cache.status} at {runner.graph_cache.dir}"
    tp_note = (f", tensor-parallel rank {tp.rank} of {tp.world_size}" + (" (mc2)" if tp.use_mc2 else "")
               if tp.enabled else "")
    cache = model.engine.cache
    quant = f", {model.config.quantization.describe()}" if model.config.quantization else ""
    log(f"loaded {model.config.architecture} from {model.path} on {model.device} ({model.dtype}{quant}){tp_note} in "
        f"{seconds:.1f} s: {model.num_parameters / 1e6:.1f} M parameters, KV cache {cache.nbytes / 2**20:.1f} MiB "
        f"({cache.num_tokens} tokens in blocks of {cache.block_size}, {cache.num_slots} batch rows, max_seq_len "
        f"{cache.max_seq_len}); {graphs}")


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

    @property
    def kv_cache(self) -> KVCache:
        return self.engine.cache

    @property
    def graph_cache_status(self) -> str | None:
        """cold | warm | rebuilt (...) for compiled graphs kept on disk; None otherwise."""
        cache = self.engine.runner.graph_cache
        return None if cache is None else cache.status

    def seed_sampling(self, seed: int) -> None:
        """Seed the noise of sampled requests that bring no seed of their own (tensor-parallel ranks
        share one seed so they sample identical tokens)."""
        self.engine.seed_default_generator(seed)

    def driver(self) -> EngineDriver:
        """An EngineDriver over this model's engine: submissions, aborts and one step per call, answered
        in plain data. `python -m zoo.serve --tp N` drives each rank's engine through it."""
        return EngineDriver(self.engine)

    def close(self) -> None:
        """Abort what is still running or waiting (their results say so); the model stays loadable
        elsewhere. Under tensor parallelism (TPModel.close) this also stops the rank processes."""
        with self.engine.lock:
            self.engine.abort(list(self.engine.running.values()) + list(self.engine.waiting), "the model was closed")

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warmup(self, batch_sizes: Sequence[int] | None = None, prompt_lens: Sequence[int] | None = None,
               context_lens: Sequence[int] | None = None) -> None:
        """Build the graphs for these buckets now (default: all; context_lens are the decode context
        buckets, see zoo.graphs.Buckets). After this, generating inside them compiles nothing."""
        with self.engine.lock:
            self.engine.runner.warmup(batch_sizes, prompt_lens, context_lens=context_lens)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], n: int = 1, best_of: int | None = None,
                 **sampling) -> list[GenerationResult] | GenerationResult:
        """Generate for one prompt (a string or a list of token ids) or a list of them.

        `sampling` are SamplingParams fields (zoo.engine.SamplingParams): max_new_tokens (64),
        temperature (0 = greedy), top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos,
        min_tokens, presence_penalty, frequency_penalty, repetition_penalty, logit_bias,
        logprobs (top alternatives per token, 0-20), prompt_logprobs.

        Returns one GenerationResult per prompt (a single one for a single prompt with n=1); with
        n > 1, n per prompt, prompt after prompt (`index` = prompt * n + choice). best_of draws
        that many samples per prompt and keeps the n most likely. More prompts than max_batch_size
        are queued and run as slots free up (continuous batching)."""
        single = _is_single_prompt(prompts) and n == 1
        draws = check_choices(n, best_of)
        params = _sampling_params(sampling)
        requests = self._requests(prompts, sample_params(params, draws, keep=n))
        for _ in self._run(requests):
            pass
        results = [r.result() for r in requests]
        failed = [r for r in results if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"generation failed: {failed[0].error}")
        results = keep_best(results, n, draws, logprobs_asked=params.logprobs is not None)
        return results[0] if single else results

    def stream(self, prompts: Prompt | Sequence[Prompt], n: int = 1, **sampling) -> "Stream":
        """Like generate(), but yields StreamEvent(index, text, token_ids, finish_reason, logprobs)
        pieces as they are produced. Closing the iterator early aborts its unfinished requests; once
        it is exhausted, `.results` holds the GenerationResults."""
        check_choices(n, None, stream=True)
        requests = self._requests(prompts, sample_params(_sampling_params(sampling), n, keep=n))
        return Stream(self._run(requests), requests)

    def _requests(self, prompts, per_prompt: list[SamplingParams]) -> list[Request]:
        """One request per prompt and sample (per_prompt: each sample's parameters); index =
        prompt * samples + sample. Every prompt is validated before any is queued."""
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        if not prompt_list:
            raise RequestError("no prompts given")
        draws = len(per_prompt)
        requests = []
        for i, p in enumerate(prompt_list):
            ids = self._encode(p, i)
            for j, params in enumerate(per_prompt):
                requests.append(self.engine.make_request(i * draws + j, ids, params, p if isinstance(p, str) else None))
        return requests

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, f"prompt {index}", self.path)

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


def _sampling_params(options: dict) -> SamplingParams:
    """generate()'s keyword arguments -> SamplingParams; TypeError naming an unknown one."""
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; the options are {sorted(known)}")
    options = dict(options)
    if isinstance(options.get("stop"), str):
        options["stop"] = (options["stop"],)
    for name in ("stop", "stop_token_ids"):
        if name in options:
            options[name] = tuple(options[name] or ())
    if options.get("logit_bias") is None:
        options.pop("logit_bias", None)
    return SamplingParams(**options)


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts))


# ---- tensor parallelism: the same Model on N ranks, used by name ------------------------------------
def _rank_model(ctx: TPContext, settings: LoadSettings, seed: int) -> Model:
    """What each rank process builds (zoo.distributed.launch calls it with the rank's TPContext)."""
    model = load_rank(settings.replace(tp=ctx, verbose=settings.verbose and ctx.rank == 0), ctx)
    model.seed_sampling(seed)  # identical sampling noise on every rank
    return model


class TPModel:
    """zoo.load(..., tp=N): a Model whose N rank processes each hold a shard. Every Model attribute
    and method is forwarded to the ranks by name (zoo.distributed.launch.RemoteObject), with the
    caller's arguments, and rank 0's answer comes back: the proxy restates nothing of Model's API.
    config, tokenizer and path are read here too, for the caller's own use (prompt formatting)."""

    def __init__(self, settings: LoadSettings):
        from zoo.distributed.launch import RankGroup  # spawning machinery: only when asked for

        self.path = settings.model_path
        self.config = read_config(self.path)  # a missing folder or a bad config fails here, not in a rank
        self.tokenizer = load_tokenizer(self.path)
        self.tp_size, self.use_mc2 = settings.tp, settings.use_mc2
        self._group = RankGroup(settings.tp, _rank_model, (settings.replace(tp=None), random.randrange(2**62)),
                                device=settings.device, use_mc2=settings.use_mc2, timeout_s=settings.tp_timeout_s,
                                threads=settings.threads)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._group.root, name)

    @property
    def closed(self) -> bool:
        return self._group.closed

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of the rank processes, rank order (to watch or signal them)."""
        return self._group.pids

    def close(self) -> None:
        """Stop the rank processes (what they were running goes with them)."""
        self._group.close()

    def __enter__(self) -> "TPModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
