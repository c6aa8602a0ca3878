"""One benchmark variant in its own process (started by compare_eager_vs_graph.py; not meant to be
run by hand).

    python benches/_worker.py serve '<json config>'   # load, then answer JSON-line commands on stdin
    python benches/_worker.py start '<json config>'   # fresh-process start: load -> first tokens, then exit

Variants:
  zoo_eager     zoo.load(compiled=False)
  zoo_compiled  zoo.load(compiled=True), warmed up for the buckets the measurements use
  zoo_compiled_int8, zoo_compiled_int4  the same with zoo.load(quantize="int8" | "int4")
  zoo_aoti      zoo.load() + the AOTInductor-exported graphs of zoo.graphs.aoti (no tracing, no compiling)
  hf_eager      transformers AutoModelForCausalLM.generate, greedy, default DynamicCache
  llamacpp_bf16, llamacpp_q8_0, llamacpp_q4_0  llama.cpp (llama-cpp-python) on a GGUF copy (benches/_gguf.py)
  hf_compiled   transformers' CPU compiled recipe: StaticCache (max_cache_len = prompt + new tokens,
                as cache_implementation="static" sizes it) + model.forward = torch.compile(model.forward,
                fullgraph=True, dynamic=False), greedy

Every generation forces exactly `new_tokens` tokens (zoo: ignore_eos; transformers: no eos id), so
all variants do the same work. Prompts are deterministic random token ids, the same in every variant.
Timing: TTFT = wall time of a generate call with one new token (call -> first token on the host);
TPOT = (time of last token - time of first token) / (tokens - 1), from zoo's per-request clocks or a
transformers streamer's per-token timestamps.
"""
from __future__ import annotations

import json
import os
import sys
import time

T_IMPORT0 = time.perf_counter()
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import peak_rss_mib, proc_status_kib  # noqa: E402



def _log(msg: str) -> None:
    print(f"[worker] {msg}", file=sys.stderr, flush=True)


def make_prompt(vocab_size: int, length: int, row: int) -> list[int]:
    """Deterministic random token ids in [3, vocab) (0-2 are usually special)."""
    g = torch.Generator().manual_seed(100_003 * length + row)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()


def _load_takes_export_dir() -> bool:
    """True when zoo.load(compiled=DIR) loads AOTInductor exports (newer zoo); else the worker wires
    zoo.graphs.aoti.ExportedGraphs into the engine itself."""
    import inspect

    import zoo

    doc = inspect.getdoc(zoo.load) or ""
    return "compiled=DIR" in doc


# ---- zoo ----------------------------------------------------------------------------------------
class ZooRunner:
    def __init__(self, cfg: dict):
        import zoo

        zoo.load  # noqa: B018 - imports zoo.api now (zoo's names load lazily): t0 times the load, not imports
        self.cfg = cfg
        self.variant = cfg["variant"]
        t0 = time.perf_counter()
        self.aoti_load_s = None
        compiled = self.variant.startswith("zoo_compiled")
        quantize = self.variant.removeprefix("zoo_compiled_") if self.variant.startswith("zoo_compiled_") else None
        aoti_api = self.variant == "zoo_aoti" and _load_takes_export_dir()
        if aoti_api:
            compiled = cfg["export_dir"]  # zoo.load(compiled=DIR): the exported graphs, no tracing
        kwargs = dict(dtype=cfg["dtype"], max_batch_size=cfg["max_batch_size"], max_seq_len=cfg.get("max_seq_len"),
                      cache_dir=cfg.get("cache_dir"), verbose=True)
        if quantize:
            kwargs["quantize"] = quantize
        try:
            self.model = zoo.load(cfg["model_path"], compiled=compiled, **kwargs)
        except ValueError as e:
            if not aoti_api:
                raise
            # zoo.load(compiled=DIR) wants the export's buckets to reach max_batch_size / max_seq_len;
            # the bench exports only batch 1 x one prompt length, so wire the graphs in by hand
            _log(f"zoo.load(compiled=DIR) refused the bench export ({e}); loading the graphs with zoo.graphs.aoti")
            aoti_api = False
            self.model = zoo.load(cfg["model_path"], compiled=False, **kwargs)
        if self.variant == "zoo_aoti":
            if aoti_api:
                self.buckets = self.model.buckets
            else:
                self._use_exported_graphs(cfg["export_dir"])
        self.load_s = time.perf_counter() - t0
        self.vocab = self.model.config.vocab_size

    def _use_exported_graphs(self, export_dir: str) -> None:
        """Swap the eager runner for one that calls the AOTInductor packages (zoo.graphs.aoti)."""
        from zoo.graphs.aoti import ExportedGraphs
        from zoo.graphs import Buckets, GraphRunner

        engine = self.model.engine
        graphs = ExportedGraphs.load(export_dir, self.model.module, engine.cache)
        self.aoti_load_s = graphs.load_seconds
        buckets = Buckets(tuple(graphs.batch_sizes), tuple(graphs.prefill_lens), tuple(graphs.context_lens))
        engine.runner = GraphRunner(graphs.prefill, graphs.decode, engine.cache, buckets, compiled=False,
                                    description=f"AOTInductor {export_dir}")
        self.buckets = buckets

    def info(self) -> dict:
        runner = self.model.engine.runner
        out = {"load_s": self.load_s, "parameters": self.model.num_parameters,
               "kv_cache_mib": self.model.engine.cache.nbytes / 2**20, "graphs": runner.description,
               "max_seq_len": self.model.engine.max_seq_len, "streamed_bytes": self._streamed_bytes()}
        if runner.graph_cache is not None:
            out["graph_cache"] = runner.graph_cache.status
        if self.aoti_load_s is not None:
            out["aoti_load_s"] = self.aoti_load_s
        return out

    def _streamed_bytes(self) -> int:
        """Bytes of weights one decode step reads, as held (quantized or not): every parameter but the
        embedding table, of which a step reads only its tokens' rows."""
        module = self.model.module
        embedding = module.model.embed_tokens.weight
        tensors = {id(t): t for t in module.parameters() if t is not embedding}
        if module.config.tie_word_embeddings:
            tensors[id(embedding)] = embedding  # the LM head reads all of it
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def warmup(self, prompt_lens: list[int], batch_sizes: list[int], decode_prompt_len: int) -> dict:
        runner = self.model.engine.runner
        t0 = time.perf_counter()
        if self.variant.startswith("zoo_compiled"):
            # only the buckets the measurements use: batch 1 x every prompt length, batch B x the decode prompt
            self.model.warmup([1], sorted(set(prompt_lens) | {decode_prompt_len}))
            for B in batch_sizes:
                if B != 1:
                    self.model.warmup([B], [decode_prompt_len])
        seconds = time.perf_counter() - t0
        firsts = {"/".join(str(k) for k in key): s for key, s in runner.first_call_seconds.items()}
        return {"compile_s": seconds if self.variant.startswith("zoo_compiled") else 0.0, "first_calls": firsts,
                "graph_cache": runner.graph_cache.status if runner.graph_cache is not None else None}

    def supports(self, batch: int, prompt_len: int) -> bool:
        if self.variant != "zoo_aoti":
            return True
        b = self.buckets
        return batch <= b.batch_sizes[-1] and prompt_len <= b.prefill_lens[-1]

    def ttft(self, prompt: list[int]) -> dict:
        t0 = time.perf_counter()
        r = self.model.generate(prompt, max_new_tokens=1, ignore_eos=True)
        wall = (time.perf_counter() - t0) * 1e3
        return {"ttft_ms": wall, "engine_ttft_ms": r.ttft_ms, "tokens": len(r.token_ids)}

    def decode(self, prompts: list[list[int]], new_tokens: int) -> dict:
        t0 = time.perf_counter()
        rs = self.model.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        wall = (time.perf_counter() - t0) * 1e3
        tpots = [r.tpot_ms for r in rs if r.tpot_ms is not None]
        return {"wall_ms": wall, "ttft_ms": sum(r.ttft_ms for r in rs) / len(rs),
                "tpot_ms": sum(tpots) / len(tpots) if tpots else None,
                "tokens": sum(len(r.token_ids) for r in rs), "token_ids": rs[0].token_ids}


# ---- transformers -------------------------------------------------------------------------------
class _Clock:
    """A generate() streamer that only timestamps: put() #0 is the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFRunner:
    def __init__(self, cfg: dict):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from zoo.device import parse_dtype

        self.cfg = cfg
        self.compiled = cfg["variant"] == "hf_compiled"
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=parse_dtype(cfg["dtype"])).eval()
        if self.compiled:
            import torch._dynamo

            # one static graph per shape, like transformers' own CompileConfig(fullgraph=True, dynamic=False)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 256)
            self.model.forward = torch.compile(self.model.forward, fullgraph=True, dynamic=False)
        self.load_s = time.perf_counter() - t0
        self.vocab = self.model.config.vocab_size
        self._GenerationConfig = GenerationConfig
        self._caches: dict = {}
        self.first_calls: dict[str, float] = {}

    def info(self) -> dict:
        return {"load_s": self.load_s, "parameters": sum(p.numel() for p in self.model.parameters()),
                "graphs": "torch.compile(model.forward, fullgraph=True, dynamic=False) + StaticCache"
                if self.compiled else "eager, DynamicCache"}

    def supports(self, batch: int, prompt_len: int) -> bool:
        return True

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, _Clock, float, float]:
        ids = torch.tensor(prompts, dtype=torch.long)
        B, L = ids.shape
        gc = self._GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        kwargs = {}
        if self.compiled:
            from transformers import StaticCache

            key = (B, L + new_tokens)
            if key not in self._caches:
                # as generate(cache_implementation="static") sizes it, but one cache per shape, kept and
                # reset between calls, and initialised eagerly (a lazily initialised cache makes the first
                # compiled call trace the allocation, and the second one recompile)
                cache = StaticCache(config=self.model.config, max_cache_len=L + new_tokens)
                num_heads, head_dim = self._cache_shape()
                cache.early_initialization(batch_size=B, num_heads=num_heads, head_dim=head_dim,
                                           dtype=self.model.dtype, device=self.model.device)
                self._caches[key] = cache
            cache = self._caches[key]
            cache.reset()
            kwargs["past_key_values"] = cache
        clock = _Clock()
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, streamer=clock,
                                  **kwargs)
        t1 = time.perf_counter()
        return out[:, L:], clock, t0, t1

    def _cache_shape(self) -> tuple[int, int]:
        shape = getattr(self.model, "_get_static_cache_init_shape", lambda: None)()
        if shape is not None:
            return shape
        c = self.model.config
        return (c.num_key_value_heads or c.num_attention_heads,
                getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def ttft(self, prompt: list[int]) -> dict:
        new, clock, t0, t1 = self._generate([prompt], 1)
        return {"ttft_ms": (t1 - t0) * 1e3, "engine_ttft_ms": (clock.times[1] - t0) * 1e3,
                "tokens": int(new.shape[1])}

    def decode(self, prompts: list[list[int]], new_tokens: int) -> dict:
        new, clock, t0, t1 = self._generate(prompts, new_tokens)
        ts = clock.times[1:]  # one per new token
        return {"wall_ms": (t1 - t0) * 1e3, "ttft_ms": (ts[0] - t0) * 1e3,
                "tpot_ms": (ts[-1] - ts[0]) * 1e3 / (len(ts) - 1) if len(ts) > 1 else None,
                "tokens": int(new.numel()), "token_ids": new[0].tolist()}

    def warmup(self, prompt_lens: list[int], batch_sizes: list[int], decode_prompt_len: int) -> dict:
        return {"compile_s": 0.0, "first_calls": {}, "graph_cache": None}


# ---- llama.cpp ----------------------------------------------------------------------------------
class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API, on a GGUF copy of the checkpoint
    (benches/_gguf.py: bf16 / q8_0 from llama.cpp's converter, q4_0 by its quantizer). Greedy
    decoding of B sequences in one llama_batch per step (one sequence id each), argmax on the host;
    the KV memory is cleared before every call. The same token ids as every other variant."""

    def __init__(self, cfg: dict):
        import llama_cpp
        import numpy as np

        from _gguf import ensure_gguf

        self.lib, self.np = llama_cpp, np
        self.outtype = cfg["variant"].removeprefix("llamacpp_")
        t0 = time.perf_counter()
        self.path = ensure_gguf(cfg["model_path"], self.outtype, cfg.get("llamacpp_src"))
        t1 = time.perf_counter()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        self.max_seqs = cfg["max_batch_size"]
        # 1024 positions per sequence: the bench's prompts and outputs fit, and 8 of them hold 1 GiB of KV
        cparams.n_ctx = min(cfg.get("max_seq_len") or 1024, 1024) * self.max_seqs
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = self.max_seqs
        cparams.n_threads = cparams.n_threads_batch = cfg["threads"]
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, self.max_seqs)
        self.convert_s, self.load_s = t1 - t0, time.perf_counter() - t1

    def info(self) -> dict:
        return {"load_s": self.load_s, "gguf_convert_s": self.convert_s, "gguf": self.path,
                "parameters": self.lib.llama_model_n_params(self.model),
                "streamed_bytes": self._streamed_bytes(), "graphs": f"llama.cpp {self.outtype} (GGUF)"}

    def _streamed_bytes(self) -> int:
        """The GGUF's tensors but the embedding table (a step reads only its tokens' rows)."""
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(self.path).tensors if t.name != "token_embd.weight")

    def supports(self, batch: int, prompt_len: int) -> bool:
        return batch <= self.max_seqs

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits); at most 512 per call."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        row = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(self.np.ctypeslib.as_array(row, shape=(self.vocab,)).argmax())

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float], float]:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        entries = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        last = []  # the batch index of each sequence's last prompt token, in the final chunk
        for start in range(0, len(entries), 512):
            chunk = entries[start:start + 512]
            self._decode(chunk)
            last += [(e[2], i) for i, e in enumerate(chunk) if e[3]]
        out = [[] for _ in prompts]
        for seq, i in last:
            out[seq].append(self._argmax(i))
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            self._decode([(out[s][-1], len(p) + len(out[s]) - 1, s, True) for s, p in enumerate(prompts)])
            for s in range(len(prompts)):
                out[s].append(self._argmax(s))
            stamps.append(time.perf_counter())
        return out, stamps, t0

    def ttft(self, prompt: list[int]) -> dict:
        _, stamps, t0 = self._generate([prompt], 1)
        return {"ttft_ms": (stamps[0] - t0) * 1e3, "engine_ttft_ms": (stamps[0] - t0) * 1e3, "tokens": 1}

    def decode(self, prompts: list[list[int]], new_tokens: int) -> dict:
        out, stamps, t0 = self._generate(prompts, new_tokens)
        return {"wall_ms": (stamps[-1] - t0) * 1e3, "ttft_ms": (stamps[0] - t0) * 1e3,
                "tpot_ms": (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1) if len(stamps) > 1 else None,
                "tokens": sum(len(o) for o in out), "token_ids": out[0]}

    def warmup(self, prompt_lens: list[int], batch_sizes: list[int], decode_prompt_len: int) -> dict:
        return {"compile_s": 0.0, "first_calls": {}, "graph_cache": None}


# ---- the serve loop -----------------------------------------------------------------------------
def make_runner(cfg: dict):
    if cfg["variant"].startswith("llamacpp_"):
        return LlamaCppRunner(cfg)
    return ZooRunner(cfg) if cfg["variant"].startswith("zoo") else HFRunner(cfg)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])
    try:
        runner = make_runner(cfg)
    except Exception as e:  # report, then exit: the driver skips this variant
        _reply({"error": f"load failed: {type(e).__name__}: {e}"})
        raise
    _reply({"ready": True, "import_s": T_LOADED - T_IMPORT0, **runner.info(), "rss_mib": _rss_mib()})
    plan = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "quit":
                break
            if op == "warmup":
                plan = cmd
                _reply(warm_pass(runner, **cmd))
            elif op == "ttft":
                L = cmd["prompt_len"]
                if not runner.supports(1, L):
                    _reply({"skipped": True})
                    continue
                prompt = make_prompt(runner.vocab, L, 0)
                _reply(_repeated(lambda: runner.ttft(prompt), cmd.get("min_time_s", 0.0), cmd.get("max_inner", 1)))
            elif op == "decode":
                B, L = cmd["batch"], cmd["prompt_len"]
                if not runner.supports(B, L):
                    _reply({"skipped": True})
                    continue
                prompts = [make_prompt(runner.vocab, L, i) for i in range(B)]
                _reply(_repeated(lambda: runner.decode(prompts, cmd["new_tokens"]), cmd.get("min_time_s", 0.0),
                                 cmd.get("max_inner", 1)))
            elif op == "stats":
                _reply({"peak_rss_mib": peak_rss_mib(), "rss_mib": _rss_mib()})
            else:
                _reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # keep serving; the driver records the error for this case
            _log(f"{op} failed: {type(e).__name__}: {e}")
            _reply({"error": f"{op} failed: {type(e).__name__}: {e}"})
    del plan


def _repeated(fn, min_time_s: float, max_inner: int) -> dict:
    """One sample: `fn` back to back until min_time_s has passed (at most max_inner calls, at least
    one); each numeric field is the median over the calls, so a millisecond-scale operation is not a
    single, wake-up-dominated call. `inner` says how many calls it took."""
    runs, t0 = [], time.perf_counter()
    while True:
        runs.append(fn())
        if len(runs) >= max(1, max_inner) or time.perf_counter() - t0 >= min_time_s:
            break
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            vals = sorted(r[key] for r in runs if r.get(key) is not None)
            out[key] = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    out["inner"] = len(runs)
    return out


def warm_pass(runner, prompt_lens: list[int], batch_sizes: list[int], new_tokens: int,
              decode_prompt_len: int) -> dict:
    """Compile what the measurements need (zoo: Model.warmup of those buckets), then run every case
    once untimed. For hf_compiled the first call of each case is its compile, so that is timed."""
    out = runner.warmup(prompt_lens, batch_sizes, decode_prompt_len)
    t0 = time.perf_counter()
    cases = {}
    for L in prompt_lens:
        if runner.supports(1, L):
            t = time.perf_counter()
            runner.ttft(make_prompt(runner.vocab, L, 0))
            cases[f"ttft/{L}"] = time.perf_counter() - t
    for B in batch_sizes:
        if runner.supports(B, decode_prompt_len):
            t = time.perf_counter()
            runner.decode([make_prompt(runner.vocab, decode_prompt_len, i) for i in range(B)], new_tokens)
            cases[f"decode/{B}"] = time.perf_counter() - t
    out["warm_pass_s"] = time.perf_counter() - t0
    out["warm_pass_cases"] = cases
    if isinstance(runner, HFRunner) and runner.compiled:
        out["compile_s"] = out["warm_pass_s"]  # first calls = compiles (prefill + decode graph per shape)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _rss_mib() -> float | None:
    kib = proc_status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


# ---- fresh-process start ------------------------------------------------------------------------
def start(cfg: dict) -> None:
    """Load -> first token -> second token in this new process; prints one JSON line."""
    torch.set_num_threads(cfg["threads"])
    # The clock starts at the load call, as documented: the library's own import (zoo, or
    # transformers) happens before it and is reported apart (import_s; the process wall covers all).
    t_lib = time.perf_counter()
    if cfg["variant"].startswith("zoo"):
        import zoo  # noqa: F401
    else:
        import transformers  # noqa: F401
    t_import = T_LOADED - T_IMPORT0 + time.perf_counter() - t_lib
    t0 = time.perf_counter()
    runner = make_runner(cfg)
    t_loaded = time.perf_counter()
    prompt = make_prompt(runner.vocab, cfg["prompt_len"], 0)
    stamps = []
    if isinstance(runner, ZooRunner):
        # The engine's first step runs prefill and then the first decode step, so take the first token's
        # time from the request's own clock (set when prefill's token arrives), not from the return.
        t1 = time.perf_counter()
        r = runner.model.generate(prompt, max_new_tokens=2, ignore_eos=True)
        stamps = [t1 + r.ttft_ms / 1e3, time.perf_counter()]
        info = runner.info()
    else:
        _, clock, _, _ = runner._generate([prompt], 2)
        stamps = clock.times[1:]
        info = runner.info()
    _reply({"variant": cfg["variant"], "import_s": t_import, "load_s": t_loaded - t0,
            "first_token_s": stamps[0] - t0, "second_token_s": stamps[1] - t0, "tokens": len(stamps),
            "peak_rss_mib": peak_rss_mib(), **{k: v for k, v in info.items() if k in ("graph_cache", "aoti_load_s")}})


T_LOADED = time.perf_counter()

if __name__ == "__main__":
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "serve":
        serve(config)
    elif mode == "start":
        start(config)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
