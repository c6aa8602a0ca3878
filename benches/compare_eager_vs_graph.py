"""Benchmark zoo eager vs zoo compiled (graph mode) vs the transformers reference, on CPU, against
this machine's memory-bandwidth roofline measured in the same run.

Usage (from the repository root):

    .venv/bin/python benches/compare_eager_vs_graph.py            # full run (~20-30 min on 2 cores)
    .venv/bin/python benches/compare_eager_vs_graph.py --quick    # seconds: tiny model, 2 repetitions
    .venv/bin/python benches/compare_eager_vs_graph.py --models tiny-llama --repetitions 7
    .venv/bin/python benches/compare_eager_vs_graph.py --models '' --model-path /path/to/Llama-3.2-1B \\
        --dtypes bfloat16 --batch-sizes 1 --prompt-lens 128

Variants (each in its own process, loaded once, then measured INTERLEAVED: for every repetition and
every case, one sample of each variant in turn, A B C D then D C B A, so drift hits all alike):
  zoo_eager     zoo.load(compiled=False)
  zoo_compiled  zoo.load(compiled=True), warmed up (Model.warmup) for the buckets used, before timing
  zoo_compiled_int8 / zoo_compiled_int4  the same with weight-only quantization (zoo.load(quantize=...));
                their bandwidth is computed on the quantized bytes they read per step
  zoo_aoti      zoo with the AOTInductor-exported graphs of zoo.graphs.aoti (tiny Llama, batch 1, prompt 32),
                when zoo.graphs.aoti exists; the export is built once under ~/.cache/zoo/bench-exports/
  hf_eager      transformers generate, greedy, DynamicCache
  hf_compiled   transformers' best CPU compiled recipe: StaticCache + model.forward =
                torch.compile(model.forward, fullgraph=True, dynamic=False), greedy

Models: tiny-llama and tiny-qwen2 (embedded in zoo, fp32), medium-llama (random-weight ~1 B Llama built
locally once under ~/.cache/zoo/bench-models/, bf16 and fp32; fp32 runs only batch 1 and one prompt
length unless --medium-fp32-full), and any --model-path checkpoint folder.

Metrics (medians and p90 over the repetitions):
  - TTFT: wall time of a batch-1 generate call with 1 new token, per prompt length (default 32/128/512;
    a length that does not fit the model's context is cut to max_seq_len - 1 and noted)
  - TPOT: time per output token after the first, at each batch size (default 1/4/8), prompts of 32
  - decode tokens/s = batch / TPOT (all sequences), and end-to-end tokens/s of the whole call
  - compile / warm-up time, and each variant's peak RSS (VmHWM of its process)
  - achieved bandwidth = weight bytes streamed per decode step x tokens/s at batch 1, as a fraction of
    the read bandwidth measured in this run (large-tensor sum and copy, all threads, best of N)
  - start-up: a new process from zoo.load(compiled=True) to the first token, graph cache cold (temporary
    cache_dir and TORCHINDUCTOR_CACHE_DIR) vs warm (the same dirs again); also eager, AOTI and
    transformers compiled for comparison
A sample repeats its call back to back for --min-sample-s (at most --max-inner calls) and keeps the median
call. Every sample also records how much CPU other processes used meanwhile; a sample of >= 0.1 s taken
while they used more than --max-foreign-share of the CPUs is retried (up to --retries times).

Outputs in --out (default benches/results/): cpu-<date>.json (environment: torch / transformers
versions, CPU model, threads; every sample), cpu-<date>.md (the tables and the target verdicts) and
cpu-<date>-{tpot,ttft,throughput,roofline,startup}.png. --quick writes quick-cpu-<date>.* instead.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# Same environment as the Makefile / test suite: compiled graphs cached outside the clone.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import _measure as M  # noqa: E402
import _models  # noqa: E402
import _report  # noqa: E402

from zoo.entrypoints.options import positive_int_list  # noqa: E402

ALL_VARIANTS = ["zoo_eager", "zoo_compiled", "zoo_compiled_int8", "zoo_compiled_int4", "zoo_aoti", "hf_eager",
                "hf_compiled", "llamacpp_bf16", "llamacpp_q8_0", "llamacpp_q4_0"]
# llama.cpp (pip install llama-cpp-python, and its source tree for the GGUF converter: benches/_gguf.py)
# runs only when --variants names it
QUANTIZED_VARIANTS = ["zoo_compiled_int8", "zoo_compiled_int4"]  # --quick leaves them out unless --variants names them


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benches/compare_eager_vs_graph.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds, for the test suite: tiny-llama fp32, prompt 32, "
                   "batch 1 and 2, 8 new tokens, 2 repetitions, no AOTI, warm start only (no cold compile)")
    p.add_argument("--models", type=_str_list, default=None,
                   help="comma list of tiny-llama, tiny-qwen2, medium-llama (default: all three; '' for none)")
    p.add_argument("--model-path", action="append", default=[], help="a Hugging Face checkpoint folder to "
                   "measure too (repeatable; dtype from --dtypes, default bfloat16)")
    p.add_argument("--dtypes", type=_str_list, help="dtypes for every model (default: fp32 for the tiny models, "
                   "--medium-dtypes for the medium one)")
    p.add_argument("--medium-dtypes", type=_str_list, default=["bfloat16", "float32"])
    p.add_argument("--medium-fp32-full", action="store_true", help="medium model in fp32 at every batch size "
                   "and prompt length too (by default only batch 1, prompt 128: the roofline point; RAM)")
    p.add_argument("--llamacpp-src", default=os.environ.get("ZOO_LLAMA_CPP_SRC"),
                   help="llama.cpp source tree (convert_hf_to_gguf.py) for the llamacpp_* variants: see benches/_gguf.py")
    p.add_argument("--variants", type=_str_list, default=None, help=f"subset of {','.join(ALL_VARIANTS)} (default: all; with --quick all but the quantized ones)")
    p.add_argument("--prompt-lens", type=positive_int_list, default=[32, 128, 512], help="TTFT prompt lengths (batch 1)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 4, 8], help="TPOT batch sizes")
    p.add_argument("--decode-prompt-len", type=int, default=32, help="prompt length of the TPOT cases")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per TPOT case (tiny / custom models)")
    p.add_argument("--medium-max-new-tokens", type=int, default=12, help="new tokens per TPOT case, medium model")
    p.add_argument("--repetitions", type=int, default=5, help="interleaved samples per case and variant")
    p.add_argument("--max-batch-size", type=int, help="zoo KV-cache slots (default: the largest batch size, >= 8)")
    p.add_argument("--max-seq-len", type=int, help="zoo max_seq_len (default: zoo's, min(max_position_embeddings, "
                   "2048)); decode attends over all of it")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="tensor size of the bandwidth probe")
    p.add_argument("--bandwidth-repeats", type=int, default=5)
    p.add_argument("--probe-mib", type=int, default=1024, help="tensor size of the read-bandwidth probe taken "
                   "before every repetition (the roofline is the best probe of the group and the run's start)")
    p.add_argument("--warm-start-models", type=_str_list, default=None,
                   help="models whose new-process start-up is measured (default: tiny-llama; e.g. "
                        "tiny-llama,medium-llama; '' for none)")
    p.add_argument("--warm-start-reps", type=int, default=3, help="warm start-up probes per variant (median)")
    p.add_argument("--no-aoti", action="store_true", help="skip the zoo AOTInductor-export variant")
    p.add_argument("--min-sample-s", type=float, default=0.3, help="a sample repeats its call back to back until "
                   "this long has passed and reports the median call (millisecond calls are noisy alone)")
    p.add_argument("--max-inner", type=int, default=20, help="at most this many calls per sample")
    p.add_argument("--max-foreign-share", type=float, default=0.25,
                   help="retry a sample when other processes used more than this share of all CPUs during it")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--out", help="output folder (default benches/results; with --quick benches/.quick, which git "
                                 "ignores: a smoke run is not a result unless you ask for it)")
    p.add_argument("--name", help="output file stem (default cpu-<date>, quick-cpu-<date> with --quick)")
    return p


# ---- sampling with contention accounting -------------------------------------------------------
def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _own_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sample(worker: M.Worker, op: str, args: dict, max_share: float, retries: int) -> dict:
    """One measurement, retried while other processes were using the CPUs; every attempt is kept."""
    attempts = []
    for _ in range(retries + 1):
        j0, w0, d0, t0 = M._busy_jiffies(), _proc_cpu_s(worker.proc.pid), _own_cpu_s(), time.perf_counter()
        reply = worker.call(op, **args)
        wall = time.perf_counter() - t0
        j1, w1, d1 = M._busy_jiffies(), _proc_cpu_s(worker.proc.pid), _own_cpu_s()
        share = None
        if j0 and j1 and wall > 0:
            busy = (j1[0] - j0[0]) / os.sysconf("SC_CLK_TCK")
            share = max(0.0, busy - (w1 - w0) - (d1 - d0)) / (wall * (os.cpu_count() or 1))
        reply["foreign_share"] = share
        attempts.append(reply)
        if reply.get("skipped") or share is None or wall < 0.1 or share <= max_share:
            break
    best = min(attempts, key=lambda r: r["foreign_share"] if r["foreign_share"] is not None else 0)
    best["attempts"] = len(attempts)
    return best


# ---- AOTI export ---------------------------------------------------------------------------------
def _zoo_source_hash() -> str:
    import zoo

    h = hashlib.sha256()
    root = os.path.dirname(zoo.__file__)
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "embedded"))
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def ensure_export(model_path: str, dtype: str, max_batch_size: int, max_seq_len: int, batch_sizes: list[int],
                  prefill_lens: list[int], log_path: str) -> tuple[str, float | None]:
    """An AOTInductor export folder for these shapes (built by `python -m zoo.export` only when missing
    or when zoo's sources / torch changed); returns (folder, build seconds or None when it was there)."""
    import torch

    key = hashlib.sha256(repr((os.path.abspath(model_path), dtype, max_batch_size, max_seq_len, batch_sizes,
                               prefill_lens, torch.__version__, _zoo_source_hash())).encode()).hexdigest()[:16]
    root = os.path.join(os.path.dirname(_models.bench_models_dir()), "bench-exports")
    out = os.path.join(root, key)
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "zoo.export", "--model-path", model_path, "--out", out, "--dtype", dtype,
           "--max-batch-size", str(max_batch_size), "--max-seq-len", str(max_seq_len),
           "--batch-sizes", ",".join(map(str, batch_sizes)), "--prefill-lens", ",".join(map(str, prefill_lens))]
    _log(f"exporting AOTInductor graphs (once): {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m zoo.export failed with code {proc.returncode} (see {log_path})")
    return out, time.perf_counter() - t0


def aoti_available() -> bool:
    try:
        import zoo.graphs.aoti  # noqa: F401
    except Exception:
        return False
    return True


# ---- one model x dtype ---------------------------------------------------------------------------
def plan_group(spec: _models.ModelSpec, dtype: str, args) -> dict:
    config = _models.read_config(spec.path)
    max_pos = int(config.get("max_position_embeddings", 2048))
    max_seq_len = args.max_seq_len or min(max_pos, 2048)
    new_tokens = args.medium_max_new_tokens if spec.kind == "medium" else args.max_new_tokens
    prompt_lens, batch_sizes = list(args.prompt_lens), list(args.batch_sizes)
    notes = []
    if spec.kind == "medium" and dtype == "float32" and not args.medium_fp32_full and not args.quick:
        prompt_lens = [L for L in prompt_lens if L == 128] or prompt_lens[:1]
        batch_sizes = [1] if 1 in batch_sizes else batch_sizes[:1]
        notes.append("fp32: batch 1 and one prompt length only (the roofline point); --medium-fp32-full for all")
    fitted = []
    for L in prompt_lens:
        if L >= max_seq_len:
            notes.append(f"prompt length {L} does not fit max_seq_len {max_seq_len}: measured at {max_seq_len - 1}")
            L = max_seq_len - 1
        fitted.append(L)
    if args.decode_prompt_len + new_tokens > max_seq_len:
        raise ValueError(f"decode prompt {args.decode_prompt_len} + {new_tokens} new tokens > max_seq_len {max_seq_len}")
    max_batch_size = args.max_batch_size or max(8, max(batch_sizes))
    if spec.kind == "medium" and dtype == "float32" and batch_sizes == [1] and not args.max_batch_size:
        max_batch_size = 1  # KV cache of 8 slots x 2048 positions would be 4.8 GB per zoo process in fp32
    return {"prompt_lens": sorted(set(fitted)), "batch_sizes": sorted(set(batch_sizes)), "new_tokens": new_tokens,
            "max_seq_len": max_seq_len, "max_batch_size": max_batch_size, "notes": notes}


def _estimated_bytes(variant: str, weights: dict, dtype: str, config: dict, plan: dict) -> int:
    """Rough resident size of a variant's process (to skip it rather than swap / OOM)."""
    w = weights["weight_bytes"]
    layers = config.get("num_hidden_layers", 1)
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config.get("hidden_size", 64) // config.get("num_attention_heads", 1)
    esize = 2 if dtype != "float32" else 4
    kv = 2 * layers * (plan["max_batch_size"] + 1) * kv_heads * (plan["max_seq_len"] + 1) * head_dim * esize
    base = 700 * 2**20
    if variant.startswith("zoo"):
        if variant.startswith("zoo_compiled_int"):
            return base + w // 2 + kv
        return base + w * (2 if variant == "zoo_compiled" and dtype != "float32" else 1) + kv
    return base + int(w * 1.1)


def run_group(spec: _models.ModelSpec, dtype: str, args, log_path: str, bandwidth: dict) -> dict:
    plan = plan_group(spec, dtype, args)
    config = _models.read_config(spec.path)
    weights = _models.weight_stats(spec.path, dtype)
    group = {"model": spec.name, "kind": spec.kind, "path": spec.path, "dtype": dtype,
             "architecture": (config.get("architectures") or ["?"])[0], "weights": weights,
             "max_batch_size": plan["max_batch_size"], "max_seq_len": plan["max_seq_len"],
             "new_tokens": plan["new_tokens"], "decode_prompt_len": args.decode_prompt_len,
             "prompt_lens": plan["prompt_lens"], "batch_sizes": plan["batch_sizes"], "notes": list(plan["notes"]),
             "roofline_gbs": bandwidth["read_gbs"], "variants": {}, "samples": [], "bandwidth_probes": []}
    variants = [v for v in args.variants if v in ALL_VARIANTS]
    export_dir = None
    if "zoo_aoti" in variants:
        variants.remove("zoo_aoti")
        if args.no_aoti or args.quick:
            pass
        elif spec.name != "tiny-llama" or dtype != "float32":
            pass  # AOTI: the tiny Llama only (an export is ~1 min per graph)
        elif not aoti_available():
            group["notes"].append("zoo.graphs.aoti is not importable: no AOTI variant")
        else:
            try:
                export_dir, build_s = ensure_export(spec.path, dtype, plan["max_batch_size"], plan["max_seq_len"],
                                                    [1], [min(plan["prompt_lens"])], log_path)
                group["aoti_export"] = {"dir": export_dir, "build_s": build_s,
                                        "buckets": {"batch_sizes": [1], "prefill_lens": [min(plan["prompt_lens"])]}}
                variants.insert(2, "zoo_aoti")
            except Exception as e:  # report and go on without it
                group["notes"].append(f"AOTI export failed: {e}")
    _log(f"== {spec.name} {dtype}: variants {', '.join(variants)}; TTFT prompts {plan['prompt_lens']}, TPOT batches "
         f"{plan['batch_sizes']} x {plan['new_tokens']} tokens, {args.repetitions} repetitions")

    base_cfg = {"model_path": spec.path, "dtype": dtype, "threads": args.threads, "llamacpp_src": args.llamacpp_src,
                "max_batch_size": plan["max_batch_size"], "max_seq_len": plan["max_seq_len"]}
    warm_args = {"prompt_lens": plan["prompt_lens"], "batch_sizes": plan["batch_sizes"],
                 "new_tokens": plan["new_tokens"], "decode_prompt_len": args.decode_prompt_len}
    workers: list[M.Worker] = []
    parallel = args.quick  # start every process at once (their load overlaps the first warm-up)
    pending = []
    try:
        for v in variants:
            need = _estimated_bytes(v, weights, dtype, config, plan)
            avail = M.mem_available_bytes()
            if avail is not None and need > avail - 512 * 2**20 and not parallel:
                group["variants"][v] = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                 f"{avail / 2**30:.1f} GiB available"}
                _log(f"   {v}: {group['variants'][v]['error']}")
                continue
            cfg = {**base_cfg, "variant": v, "export_dir": export_dir}
            w = M.Worker(cfg, log_path)
            if parallel:
                pending.append(w)  # start every process now, warm them up one at a time below
                continue
            _start_one(w, warm_args, group, workers)
        for w in pending:
            _start_one(w, warm_args, group, workers)

        cases = [("ttft", {"prompt_len": L}) for L in plan["prompt_lens"]]
        cases += [("decode", {"batch": B, "prompt_len": args.decode_prompt_len, "new_tokens": plan["new_tokens"]})
                  for B in plan["batch_sizes"]]
        for rep in range(args.repetitions):
            t_rep = time.perf_counter()
            # the roofline is probed in every repetition too (read only, all threads): this VM's bandwidth
            # moves with its neighbours, and the best probe of the group is the machine's capability
            probe = M.measure_bandwidth(args.probe_mib * 2**20, 3, args.threads, copy=False)
            group["bandwidth_probes"].append(probe)
            for op, case_args in cases:
                order = workers if rep % 2 == 0 else list(reversed(workers))
                for w in order:
                    if w.name in group["variants"] and group["variants"][w.name].get("dead"):
                        continue
                    try:
                        s = sample(w, op, {**case_args, "min_time_s": args.min_sample_s, "max_inner": args.max_inner},
                                   args.max_foreign_share, args.retries)
                    except M.WorkerError as e:
                        group["variants"][w.name].update(error=str(e), dead=w.proc.poll() is not None)
                        _log(f"   {w.name}: {e}")
                        continue
                    if s.get("skipped"):
                        continue
                    s.pop("token_ids", None) if rep else None
                    group["samples"].append({"variant": w.name, "rep": rep, "op": op, **case_args, **s})
            _log(f"   repetition {rep + 1}/{args.repetitions} in {time.perf_counter() - t_rep:.1f} s")
        for w in workers:
            try:
                group["variants"][w.name].update(w.call("stats", timeout=60))
            except M.WorkerError as e:
                group["variants"][w.name].setdefault("error", str(e))
    finally:
        for w in workers + pending:
            w.request_quit()
        for w in workers + pending:
            w.close()
    summarize_group(group)
    return group


def _start_one(w: M.Worker, warm_args: dict, group: dict, workers: list) -> None:
    t0 = time.perf_counter()
    try:
        info = w.ready(timeout=1800)
        _log(f"   {w.name}: loaded in {info['load_s']:.1f} s; warming up")
        warm = w.call("warmup", timeout=3600, **warm_args)
    except M.WorkerError as e:
        group["variants"][w.name] = {"error": str(e)}
        _log(f"   {w.name}: {e}")
        w.close()
        return
    info.pop("ready", None)
    group["variants"][w.name] = {**info, **warm, "start_to_ready_s": time.perf_counter() - t0}
    _log(f"   {w.name}: ready (compile/warm-up {warm['compile_s']:.1f} s, warm pass {warm['warm_pass_s']:.1f} s)")
    workers.append(w)


def summarize_group(group: dict) -> None:
    by = {}
    for s in group["samples"]:
        if s.get("error"):
            continue
        key = (s["op"], s.get("batch", 1) if s["op"] == "decode" else s["prompt_len"], s["variant"])
        by.setdefault(key, []).append(s)
    group["ttft_ms"] = {str(L): {} for L in group["prompt_lens"]}
    group["tpot_ms"] = {str(B): {} for B in group["batch_sizes"]}
    group["decode_tok_s"] = {str(B): {} for B in group["batch_sizes"]}
    group["e2e_tok_s"] = {str(B): {} for B in group["batch_sizes"]}
    group["decode_ttft_ms"] = {str(B): {} for B in group["batch_sizes"]}
    for (op, x, v), ss in by.items():
        if op == "ttft":
            group["ttft_ms"][str(x)][v] = M.summarize([s["ttft_ms"] for s in ss])
        else:
            B = x
            group["tpot_ms"][str(B)][v] = M.summarize([s["tpot_ms"] for s in ss])
            group["decode_tok_s"][str(B)][v] = M.summarize([B * 1e3 / s["tpot_ms"] for s in ss if s["tpot_ms"]])
            group["e2e_tok_s"][str(B)][v] = M.summarize([s["tokens"] * 1e3 / s["wall_ms"] for s in ss])
            group["decode_ttft_ms"][str(B)][v] = M.summarize([s["ttft_ms"] for s in ss])
    shares = [s["foreign_share"] for s in group["samples"] if s.get("foreign_share") is not None]
    group["foreign_share"] = M.summarize(shares)
    group["retried_samples"] = sum(1 for s in group["samples"] if s.get("attempts", 1) > 1)
    # achieved bandwidth at batch 1, against the best read bandwidth probed before and during the group
    probes = [p["read_gbs"] for p in group["bandwidth_probes"]]
    group["roofline_before_gbs"] = group["roofline_gbs"]
    group["roofline_gbs"] = max([group["roofline_gbs"]] + probes)
    group["probe_read_gbs"] = M.summarize(probes)
    group["bandwidth"] = {}
    if "1" in group["tpot_ms"]:
        for v, st in group["decode_tok_s"]["1"].items():
            if st:
                streamed = group["variants"].get(v, {}).get("streamed_bytes") or group["weights"]["streamed_bytes"]
                achieved = streamed * st["median"] / 1e9
                group["bandwidth"][v] = {"achieved_gbs": achieved, "roofline_gbs": group["roofline_gbs"],
                                         "fraction": achieved / group["roofline_gbs"], "tok_s": st["median"]}
                if probes:  # the typical bandwidth while the group ran (neighbours share the host's memory)
                    med = group["probe_read_gbs"]["median"]
                    group["bandwidth"][v].update(median_probe_gbs=med, fraction_of_median_probe=achieved / med)
    # greedy tokens vs transformers eager (first repetition, batch 1 decode)
    ref = {s["variant"]: s.get("token_ids") for s in group["samples"]
           if s["op"] == "decode" and s.get("batch") == 1 and s.get("token_ids")}
    if "hf_eager" in ref:
        group["tokens_match"] = {v: sum(a == b for a, b in zip(ids, ref["hf_eager"])) / max(1, len(ref["hf_eager"]))
                                 for v, ids in ref.items() if v != "hf_eager"}


# ---- new-process start-up ------------------------------------------------------------------------
def run_warm_start(spec: _models.ModelSpec, dtype: str, args, log_path: str, export_dir: str | None) -> list[dict]:
    plan = plan_group(spec, dtype, args)
    prompt_len = args.decode_prompt_len
    base = {"model_path": spec.path, "dtype": dtype, "threads": args.threads, "prompt_len": prompt_len,
            "max_batch_size": plan["max_batch_size"], "max_seq_len": plan["max_seq_len"]}
    out = []
    reps = max(1, args.warm_start_reps)
    variants = [v for v in ("zoo_compiled", "zoo_eager", "zoo_aoti", "hf_compiled") if v in args.variants]
    if export_dir is None and "zoo_aoti" in variants:
        variants.remove("zoo_aoti")
    if args.quick:
        variants = [v for v in variants if v == "zoo_compiled"]
    for v in variants:
        entry = {"model": spec.name, "dtype": dtype, "variant": v, "prompt_len": prompt_len, "cold": None,
                 "warm": [], "cold_s": None, "warm_s": None, "speedup": None}
        _log(f"== start-up {spec.name} {dtype} {v}")
        try:
            if v in ("zoo_compiled", "hf_compiled"):
                tmp = tempfile.mkdtemp(prefix="zoo-bench-start-")
                env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
                cfg = {**base, "variant": v, "cache_dir": tmp}
                try:
                    if args.quick:
                        # no cold compile in --quick: warm = the default caches the workers just filled
                        env, cfg = {}, {**base, "variant": v}
                        entry["note"] = "--quick: warm start only (default caches, filled by the run above)"
                    else:
                        entry["cold"] = M.run_start_probe(cfg, log_path, env)
                        entry["cold_s"] = entry["cold"]["first_token_s"]
                        _log(f"   cold: first token {entry['cold_s']:.1f} s")
                    for _ in range(reps):
                        entry["warm"].append(M.run_start_probe(cfg, log_path, env))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                cfg = {**base, "variant": v, "export_dir": export_dir}
                for _ in range(reps):
                    entry["warm"].append(M.run_start_probe(cfg, log_path))
                entry["note"] = ("zoo eager: no graphs to compile or load (the floor for a start-up)" if v == "zoo_eager"
                                 else "zoo AOTI: graphs exported ahead of time once (python -m zoo.export), loaded "
                                      "without tracing; 'cold' does not apply")
        except (M.WorkerError, subprocess.TimeoutExpired) as e:
            entry["error"] = str(e)
            _log(f"   {v}: {e}")
        if entry["warm"]:
            warm = M.summarize([w["first_token_s"] for w in entry["warm"]])
            entry["warm_s"] = warm["median"]
            entry["warm_stats"] = warm
            entry["warm_second_token_s"] = M.summarize([w["second_token_s"] for w in entry["warm"]])["median"]
            entry["warm_process_wall_s"] = M.summarize([w["process_wall_s"] for w in entry["warm"]])["median"]
            _log(f"   warm: first token {entry['warm_s']:.2f} s (median of {len(entry['warm'])})")
            if entry["cold_s"]:
                entry["speedup"] = entry["cold_s"] / entry["warm_s"]
                # the same from process start (python + torch + library imports included)
                entry["cold_process_wall_s"] = entry["cold"]["process_wall_s"]
                entry["process_speedup"] = entry["cold_process_wall_s"] / entry["warm_process_wall_s"]
        out.append(entry)
    return out


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models if args.models is not None else ["tiny-llama"]
        args.prompt_lens = [32] if args.prompt_lens == [32, 128, 512] else args.prompt_lens
        args.batch_sizes = [1, 2] if args.batch_sizes == [1, 4, 8] else args.batch_sizes
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.medium_max_new_tokens = min(args.medium_max_new_tokens, 4)
        args.repetitions = min(args.repetitions, 2)
        args.bandwidth_mib = min(args.bandwidth_mib, 256)
        args.bandwidth_repeats = min(args.bandwidth_repeats, 2)
        args.probe_mib = min(args.probe_mib, 128)
        args.warm_start_reps = 1
        args.retries = 0
        args.min_sample_s = min(args.min_sample_s, 0.05)
    models = args.models if args.models is not None else ["tiny-llama", "tiny-qwen2", "medium-llama"]
    warm_models = args.warm_start_models if args.warm_start_models is not None else ["tiny-llama"]
    if args.variants is None:
        # the quantized variants' kernels and graphs are tested in tests/test_quant.py; in the suite's
        # quick run their two extra compiles would cost minutes
        args.variants = [v for v in ALL_VARIANTS if not (args.quick and v in QUANTIZED_VARIANTS)
                         and not v.startswith("llamacpp_")]
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {ALL_VARIANTS}")

    import torch

    torch.set_num_threads(args.threads)
    now = dt.datetime.now()
    stem = args.name or f"{'quick-' if args.quick else ''}cpu-{now:%Y-%m-%d}"
    args.out = args.out or os.path.join(HERE, ".quick" if args.quick else "results")
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, f"{stem}.log")
    open(log_path, "w").close()
    monitor = M.CpuMonitor()
    t_start = time.perf_counter()
    specs = _models.resolve_models(models, args.model_path, args.medium_dtypes, args.dtypes)
    results = {
        "schema": "zoo-bench-cpu/1",
        "created": now.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": shlex.join(["python", os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else argv)),
        "environment": M.environment(args.threads),
        "config": {"repetitions": args.repetitions, "prompt_lens": args.prompt_lens, "batch_sizes": args.batch_sizes,
                   "decode_prompt_len": args.decode_prompt_len, "max_new_tokens": args.max_new_tokens,
                   "medium_max_new_tokens": args.medium_max_new_tokens, "variants": args.variants,
                   "models": [s.name for s in specs], "threads": args.threads,
                   "max_foreign_share": args.max_foreign_share, "retries": args.retries,
                   "torchinductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")},
        "bandwidth": [], "groups": [], "warm_start": [],
    }
    _log(f"environment: {results['environment']['cpu_model']}, torch {results['environment']['torch']}, "
         f"transformers {results['environment']['transformers']}, {args.threads} threads")

    def bandwidth(when: str) -> dict:
        bw = M.measure_bandwidth(args.bandwidth_mib * 2**20, args.bandwidth_repeats, args.threads)
        bw["when"] = when
        results["bandwidth"].append(bw)
        _log(f"bandwidth ({when}): read {bw['read_gbs']:.1f} GB/s (fp32 sum {bw['sum_fp32_gbs']:.1f}, bf16 sum "
             f"{bw['sum_bf16_gbs']:.1f}), copy {bw['copy_gbs']:.1f} GB/s")
        return bw

    bw = bandwidth("start")
    exports = {}
    for spec in specs:
        if spec.kind == "medium" and not spec.path:
            spec.path = _models.ensure_medium_llama()
        for dtype in spec.dtypes:
            if spec.kind == "medium" and results["groups"]:
                bw = bandwidth(f"before {spec.name} {dtype}")  # close in time to the roofline point
            try:
                group = run_group(spec, dtype, args, log_path, bw)
            except Exception as e:  # a broken model must not lose the others' results
                _log(f"{spec.name} {dtype} failed: {type(e).__name__}: {e}")
                results.setdefault("errors", []).append(f"{spec.name} {dtype}: {type(e).__name__}: {e}")
                continue
            results["groups"].append(group)
            if group.get("aoti_export"):
                exports[(spec.name, dtype)] = group["aoti_export"]["dir"]
    for spec in specs:
        if spec.name in warm_models:
            dtype = spec.dtypes[0]
            results["warm_start"] += run_warm_start(spec, dtype, args, log_path, exports.get((spec.name, dtype)))
    bandwidth("end")
    results["roofline_gbs"] = max(b["read_gbs"] for b in results["bandwidth"])
    results["machine"] = monitor.report()
    results["elapsed_s"] = time.perf_counter() - t_start
    paths = _report.write_all(results, args.out, stem)
    _log(f"done in {results['elapsed_s']:.0f} s: {paths['json']}, {paths['markdown']}, {len(paths['plots'])} plots")
    for t in results["targets"]:
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        _log(f"target {t['id']}: {verdict}: {t['measured']}")
    print(paths["json"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
