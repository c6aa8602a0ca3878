"""What the non-finite weight check (zoo.loader.load_weights(check_finite=True)) costs at load time.

Loads the medium random-weight Llama (~1 B parameters, bf16; built once by benches/_models.py)
with the check on and off, interleaved, and prints the medians and their ratio. Run on a quiet
machine:  .venv/bin/python benches/weight_check_cost.py [--repeats 5] [--out benches/results/X.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _models  # noqa: E402
from zoo.loader import load_weights  # noqa: E402
from zoo.models import read_config, spec_for  # noqa: E402


def load_once(path: str, check: bool) -> float:
    config = read_config(path)
    with torch.device("meta"):
        module = spec_for(config).model_class(config)
    t0 = time.perf_counter()
    load_weights(module, path, torch.bfloat16, torch.device("cpu"), check_finite=check)
    return time.perf_counter() - t0


def zoo_load_once(path: str, check: bool) -> float:
    import zoo

    t0 = time.perf_counter()
    zoo.load(path, dtype="bfloat16", max_batch_size=1, max_seq_len=256, check_weights=check)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the result table (Markdown) here")
    args = p.parse_args()
    path = _models.ensure_medium_llama()
    load_once(path, True)  # page cache warm for both variants
    lines = ["| what is timed | weight check | median (s) | runs |", "| --- | --- | --- | --- |"]
    summary = []
    for what, fn in (("load_weights", load_once), ("zoo.load (eager, whole)", zoo_load_once)):
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                times[check].append(fn(path, check))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        for check, median in ((False, off), (True, on)):
            lines.append(f"| {what} | {'on' if check else 'off'} | {median:.3f} | "
                         f"{', '.join(f'{t:.2f}' for t in times[check])} |")
        summary.append(f"- {what}: the check costs {on - off:+.3f} s = {(on / off - 1) * 100:+.1f}%")
    lines += ["", *summary, "", f"medium-llama (~1 B parameters, 1.9 GB in bf16, page cache warm), "
                                f"{torch.get_num_threads()} threads, interleaved, {args.repeats} runs each"]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Non-finite weight check: cost at load time\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
