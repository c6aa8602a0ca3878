"""Decode time per token with the paged KV cache against the contiguous cache it replaced, on the
whole model: this tree against a checkout of the last contiguous-cache commit, interleaved in one
run.

The contiguous layout (one [slots, KV, max_seq_len, hd] tensor per layer) no longer exists in
this tree, so the baseline is another checkout: `git worktree add /tmp/zoo-contiguous 79076c7`
(the commit before the paged cache landed). Each side runs in its own process, imports zoo from
its tree, loads the medium bench model (random-weight Llama-3.2-1B shape) in bfloat16, compiled
(the CPU dynamic-length graphs), and answers measurement commands on stdin; the driver alternates
the two sides, batch 1 and 8, for --rounds rounds. One measurement: B prompts of 512 tokens,
65 new tokens each (ignore_eos), time per output token from zoo's per-request clocks (context
512-577).

    git worktree add /tmp/zoo-contiguous 79076c7
    .venv/bin/python benches/paged_vs_contiguous_decode.py --baseline-tree /tmp/zoo-contiguous
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = r"""
import json, sys
import torch
import zoo
model = zoo.load(sys.argv[1], dtype="bfloat16", max_batch_size=8, max_seq_len=2048, compiled=True)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(10, 30000, (512,), generator=g).tolist() for _ in range(8)]
for B in (1, 8):
    model.generate(prompts[:B], max_new_tokens=4, ignore_eos=True)  # compiles (or loads) the graphs
print(json.dumps({"ready": zoo.__file__}), flush=True)
for line in sys.stdin:
    B = int(line)
    results = model.generate(prompts[:B], max_new_tokens=65, ignore_eos=True)
    print(json.dumps({"tpot_ms": sum(r.tpot_ms for r in results) / B}), flush=True)
"""


def start(tree: str, model_path: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, model_path], cwd=tree, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready = json.loads(proc.stdout.readline())
    print(f"{tree}: zoo from {ready['ready']}", flush=True)
    return proc


def ask(proc: subprocess.Popen, B: int) -> float:
    proc.stdin.write(f"{B}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["tpot_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-tree", required=True, help="a checkout of the contiguous-cache commit (79076c7)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from _models import ensure_medium_llama

    path = ensure_medium_llama()
    sides = {"contiguous": start(os.path.abspath(args.baseline_tree), path), "paged": start(ROOT, path)}
    times = {(name, B): [] for name in sides for B in (1, 8)}
    for rnd in range(args.rounds):
        for B in (1, 8):
            for name, proc in sides.items():
                times[name, B].append(ask(proc, B))
                print(f"round {rnd}, batch {B}, {name}: {times[name, B][-1]:.1f} ms/token", flush=True)
    for proc in sides.values():
        proc.stdin.close()
        proc.wait()
    print("\n| batch | contiguous | paged | paged / contiguous |")
    print("| --- | --- | --- | --- |")
    for B in (1, 8):
        c, p = statistics.median(times["contiguous", B]), statistics.median(times["paged", B])
        print(f"| {B} | {c:.1f} ms | {p:.1f} ms | {p / c:.3f}x |")


if __name__ == "__main__":
    main()
