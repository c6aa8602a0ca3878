"""zoo.pd measurements on loopback: KV transfer throughput and time to first token (TTFT),
disaggregated vs colocated.

    .venv/bin/python benches/pd_transfer.py [--reps 5] [--lens 64,256,1024,1536] [--compiled]

Three parts, written to benches/results/pd_transfer.{json,md}:
1. raw transport: KVTransport (gloo process group, as zoo.pd uses it) between two processes,
   synthetic tensors of 1-256 MiB; time from "go" to the last byte received.
2. PD pulls: a prompt process (`python -m zoo.pd --role prompt`) prefills prompts of several
   lengths on a bigger random-weight Llama (64 KiB of fp32 KV per token); the decoder (this
   process) pulls each KV. Pull time = pull request -> last byte received, so it includes the
   control round trip and the receive buffer's allocation.
3. TTFT: the same prompts with max_new_tokens=1, colocated (decoder model's own generate) vs
   disaggregated (LLMEngine.generate: prefill RPC + pull + merge + first token), interleaved, the
   order alternating per repetition; medians.

The machine: whatever runs this (the results record os.cpu_count() and the load average before
and after). On this project's 2-core CPU VM both processes share the two cores, other jobs may run
at the same time, and loopback is a memory copy through the kernel: the numbers are for this
machine, not for a real network or an accelerator.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Wide KV, modest compute: 16 layers x 8 KV heads x head_dim 64 -> 2*16*8*64*4 B = 64 KiB of fp32 KV
# per token, while a 1536-token prefill stays at a few seconds on 2 cores.
BENCH_MODEL = dict(hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=1024, vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-5)
RAW_SIZES_MIB = [1, 4, 16, 64, 256]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_model(out_dir: str) -> str:
    """A random-weight Llama saved with transformers (no network); rebuilt only when missing."""
    marker = os.path.join(out_dir, "bench-spec.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == BENCH_MODEL:
                return out_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BENCH_MODEL)
    config.architectures = ["LlamaForCausalLM"]
    config.eos_token_id = config.bos_token_id = None  # no EOS: every run goes the full length
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)
    with open(marker, "w") as f:
        json.dump(BENCH_MODEL, f)
    return out_dir


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


# ---- 1. raw transport ---------------------------------------------------------------------------
def raw_sender(store_port: int, sizes: list[int], reps: int) -> None:
    """Child process: rank 0, sends each size when the receiver says go."""
    from zoo.pd.transport import PROMPT_RANK, KVTransport, store_client

    store = store_client("127.0.0.1", store_port, 60)
    t = KVTransport(store, "rawbench", PROMPT_RANK, "gloo", torch.device("cpu"), 60, "127.0.0.1")
    for size in sizes:
        payload = torch.ones(size, dtype=torch.uint8)
        for rep in range(reps + 1):
            store.wait([f"go/{size}/{rep}"])
            t.send(payload, tag=rep)
    store.wait(["done"])
    t.close()


def measure_raw(reps: int) -> list[dict]:
    from zoo.pd.transport import DECODER_RANK, KVTransport, store_server

    sizes = [m * 2**20 for m in RAW_SIZES_MIB]
    store = store_server("127.0.0.1", 0, 60)
    child = subprocess.Popen([sys.executable, __file__, "_raw_sender", str(store.port), ",".join(map(str, sizes)),
                              str(reps)])
    try:
        t = KVTransport(store, "rawbench", DECODER_RANK, "gloo", torch.device("cpu"), 60, "127.0.0.1")
        rows = []
        for size in sizes:
            times = []
            for rep in range(reps + 1):  # rep 0 is a warm-up
                t0 = time.perf_counter()
                store.set(f"go/{size}/{rep}", "1")
                t.recv([size], torch.uint8, tag=rep)
                if rep:
                    times.append(time.perf_counter() - t0)
            s = summary(times)
            rows.append({"bytes": size, "seconds": s, "GB_per_s": size / s["median"] / 1e9})
            log(f"raw transport {size / 2**20:.0f} MiB: median {s['median'] * 1e3:.1f} ms, "
                f"{rows[-1]['GB_per_s']:.2f} GB/s")
        store.set("done", "1")
        t.close()
        child.wait(timeout=60)
        return rows
    finally:
        if child.poll() is None:
            child.kill()


# ---- 2 + 3. PD pulls and TTFT ---------------------------------------------------------------------
def prompt_of(length: int, rep: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 * length + rep)
    return torch.randint(1, BENCH_MODEL["vocab_size"], (length,), generator=g).tolist()


def measure_pd(model_path: str, lens: list[int], reps: int, compiled: bool) -> tuple[list[dict], list[dict]]:
    import zoo
    from zoo.pd import LLMEngine, LLMReq, LLMRole
    from zoo.pd.cli import wait_ready

    max_seq_len = max(lens) + 64
    extra = ["--compiled"] if compiled else []
    with tempfile.TemporaryDirectory(prefix="zoo-pd-bench-") as tmp:
        ready = os.path.join(tmp, "ready.json")
        proc = subprocess.Popen([sys.executable, "-m", "zoo.pd", "--role", "prompt", "--listen", "127.0.0.1:0",
                                 "--ready-file", ready, "--model-path", model_path, "--max-batch-size", "1",
                                 "--max-seq-len", str(max_seq_len), "--kv-ttl", "600", *extra])
        try:
            info = wait_ready(ready, proc, timeout=300)
            model = zoo.load(model_path, max_batch_size=1, max_seq_len=max_seq_len, compiled=compiled)
            decoder = LLMEngine(LLMRole.DECODER, 1, model)
            decoder.init({"sync_kv_timeout": 60, "prefill_timeout": 600})
            decoder.link(0, info["address"])
            req_ids = iter(range(10**6))

            def disaggregated(prompt):
                before_b, before_s = decoder.kv_bytes_received, decoder.kv_transfer_seconds
                t0 = time.perf_counter()
                r = decoder.generate([LLMReq(next(req_ids), prompt, max_new_tokens=1)])[0]
                wall = time.perf_counter() - t0
                assert r.finish_reason == "length", r.error
                return {"ttft_ms": r.ttft_ms, "wall_ms": wall * 1e3, "token": r.token_ids[0],
                        "pull_s": decoder.kv_transfer_seconds - before_s,
                        "bytes": decoder.kv_bytes_received - before_b}

            def colocated(prompt):
                t0 = time.perf_counter()
                r = model.generate(prompt, max_new_tokens=1)
                return {"ttft_ms": r.ttft_ms, "wall_ms": (time.perf_counter() - t0) * 1e3, "token": r.token_ids[0]}

            pulls, ttfts = [], []
            for n in lens:
                warm = prompt_of(n, 999)
                colocated(warm), disaggregated(warm)  # first calls of this bucket on both sides
                d_runs, c_runs = [], []
                for rep in range(reps):
                    p = prompt_of(n, rep)
                    order = (disaggregated, colocated) if rep % 2 == 0 else (colocated, disaggregated)
                    out = {f.__name__: f(p) for f in order}
                    assert out["disaggregated"]["token"] == out["colocated"]["token"]  # same first token
                    d_runs.append(out["disaggregated"])
                    c_runs.append(out["colocated"])
                kv_bytes = d_runs[0]["bytes"]
                pull = summary([r["pull_s"] for r in d_runs])
                pulls.append({"prompt_len": n, "kv_bytes": kv_bytes, "pull_seconds": pull,
                              "GB_per_s": kv_bytes / pull["median"] / 1e9})
                c, d = summary([r["ttft_ms"] for r in c_runs]), summary([r["ttft_ms"] for r in d_runs])
                ttfts.append({"prompt_len": n, "colocated_ttft_ms": c, "disaggregated_ttft_ms": d,
                              "overhead_ms": d["median"] - c["median"], "pull_ms_median": pull["median"] * 1e3})
                log(f"prompt {n}: KV {kv_bytes / 2**20:.1f} MiB pulled in {pull['median'] * 1e3:.1f} ms "
                    f"({pulls[-1]['GB_per_s']:.2f} GB/s); TTFT colocated {c['median']:.1f} ms, "
                    f"disaggregated {d['median']:.1f} ms")
            decoder.finalize()
            return pulls, ttfts
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def write_markdown(path: str, result: dict) -> None:
    m, before, after = result["machine"], result["machine"]["loadavg"], result["loadavg_after"]
    lines = [
        "# zoo.pd: KV transfer and time to first token over loopback",
        "",
        f"Measured {result['date']} by `benches/pd_transfer.py` (reps {result['reps']}, medians; eager, fp32, "
        f"{result['threads_per_process']} torch thread(s) per process). "
        f"Machine: {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}. The prompt and decoder "
        "processes share these cores, and other jobs may have been running: load average "
        f"{before[0]:.2f} before, {after[0]:.2f} after. Loopback TCP is a kernel memory copy, so these "
        "numbers describe this machine only, not a network or an accelerator link.",
        "",
        f"Model: random-weight Llama, {result['model']['num_hidden_layers']} layers, "
        f"{result['model']['num_key_value_heads']} KV heads x head_dim "
        f"{result['model']['hidden_size'] // result['model']['num_attention_heads']}: "
        f"{result['kv_bytes_per_token'] // 1024} KiB of fp32 KV per prompt token.",
        "",
        "## 1. Raw transport (gloo process group, two processes)",
        "",
        "| size | median time | throughput (median) | best of the reps |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in result["raw_transport"]:
        lines.append(f"| {r['bytes'] / 2**20:.0f} MiB | {r['seconds']['median'] * 1e3:.1f} ms | "
                     f"{r['GB_per_s']:.2f} GB/s | {r['bytes'] / r['seconds']['min'] / 1e9:.2f} GB/s |")
    lines += ["", "## 2. PD pulls of real prefilled KV (pull request -> last byte, control round trip included)",
              "", "| prompt tokens | KV bytes (real tokens only) | median pull | throughput (median) | best |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for r in result["pd_pulls"]:
        lines.append(f"| {r['prompt_len']} | {r['kv_bytes'] / 2**20:.1f} MiB | "
                     f"{r['pull_seconds']['median'] * 1e3:.1f} ms | {r['GB_per_s']:.2f} GB/s | "
                     f"{r['kv_bytes'] / r['pull_seconds']['min'] / 1e9:.2f} GB/s |")
    lines += ["", "## 3. Time to first token, max_new_tokens=1 (interleaved, medians)", "",
              "| prompt tokens | colocated | disaggregated | difference | of which KV pull |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for r in result["ttft"]:
        lines.append(f"| {r['prompt_len']} | {r['colocated_ttft_ms']['median']:.1f} ms | "
                     f"{r['disaggregated_ttft_ms']['median']:.1f} ms | {r['overhead_ms']:+.1f} ms | "
                     f"{r['pull_ms_median']:.1f} ms |")
    lines += ["", "The spread between repetitions is large (see the JSON for every value): the machine was "
              "shared, and the receive side also pays for fresh pages of its receive buffer.", "",
              "Disaggregated TTFT = decoder submit -> first token: the prefill call to the prompt process, "
              "the KV pull, the merge into a batch slot and the engine step that emits the first token "
              "(sampled by the prompt side). The same first token is asserted for both modes.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main() -> int:
    if sys.argv[1:2] == ["_raw_sender"]:
        raw_sender(int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lens", default="64,256,1024,1536")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each process (default 1: two processes on two cores; with 2 each, "
                         "OpenMP barriers on an oversubscribed machine slowed the main-thread prefill up to 10x)")
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("ZOO_CACHE_DIR", os.path.expanduser(
        "~/.cache/zoo")), "bench-models", "pd-kv-llama"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pd_transfer"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child processes (prompt role, raw sender) too
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "reps": args.reps, "machine": machine(),
              "model": BENCH_MODEL, "threads_per_process": args.threads}
    hd = BENCH_MODEL["hidden_size"] // BENCH_MODEL["num_attention_heads"]
    result["kv_bytes_per_token"] = 2 * BENCH_MODEL["num_hidden_layers"] * BENCH_MODEL["num_key_value_heads"] * hd * 4
    log("raw transport ...")
    result["raw_transport"] = measure_raw(args.reps)
    log(f"building / loading the bench model in {args.model_dir} ...")
    path = build_model(args.model_dir)
    result["pd_pulls"], result["ttft"] = measure_pd(path, [int(x) for x in args.lens.split(",")], args.reps,
                                                    args.compiled)
    result["loadavg_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    write_markdown(args.out + ".md", result)
    log(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
