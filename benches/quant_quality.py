"""What weight-only quantization costs in accuracy (zoo.load(quantize=...)), measured two ways:

1. The embedded tiny models (trained on the Zen of Python, so their predictions mean something):
   greedy tokens of int8 / int4 against bf16 on the Zen prompts, 32 new tokens each — how many
   prompts come out identical, and the share of positions that agree up to the first difference.
2. The random-weight ~1 B Llama (benches/_models.py "medium"): logits per step of bf16, int8 and
   int4 (activations fp32, so only the weights differ; then int8 / int4 in a bf16 run, as deployed,
   int4 decode in zoo's kernel with int8 activations) against the fp32 model, over a prefill and
   decode steps fed the fp32 model's greedy tokens: cosine similarity and max |diff| of the
   logits, and how often the argmax agrees.

Usage: .venv/bin/python benches/quant_quality.py [--steps 16] [--skip-medium]
Writes benches/results/quant_quality-cpu-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402

import _models  # noqa: E402
import _report  # noqa: E402
import zoo  # noqa: E402

ZEN_PROMPTS = ["Beautiful is", "Explicit is", "Simple is", "Complex is", "Flat is", "Sparse is", "Readability",
               "Special cases", "Errors should", "In the face of", "There should be", "Now is better"]


def tiny_agreement(new_tokens: int) -> list[str]:
    lines = ["## Embedded tiny models: greedy tokens against bf16", "",
             f"{len(ZEN_PROMPTS)} Zen prompts, {new_tokens} new tokens each (EOS ignored).", "",
             "| model | mode | prompts identical to bf16 | positions equal before the first difference |",
             "| --- | --- | --- | --- |"]
    for family in ("llama", "qwen2"):
        path = os.path.join(REPO, "zoo", "embedded", f"tiny-{family}")
        ref = [r.token_ids for r in zoo.load(path, dtype="bfloat16").generate(
            ZEN_PROMPTS, max_new_tokens=new_tokens, ignore_eos=True)]
        for mode in ("int8", "int4"):
            got = [r.token_ids for r in zoo.load(path, dtype="bfloat16", quantize=mode).generate(
                ZEN_PROMPTS, max_new_tokens=new_tokens, ignore_eos=True)]
            same = sum(g == r for g, r in zip(got, ref))
            prefix = sum(_common_prefix(g, r) for g, r in zip(got, ref)) / (len(ref) * new_tokens)
            lines.append(f"| tiny-{family} | {mode} | {same} / {len(ref)} | {100 * prefix:.0f}% |")
            print(lines[-1], flush=True)
    return lines + [""]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _step_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [1 + len(tokens), V]: the prefill of `prompt`, then one decode step per given token."""
    engine = model.engine
    slot = engine.cache.alloc()
    try:
        out = [engine.runner.prefill([prompt], [slot])[0].float().clone()]
        B = engine.runner.buckets.batch_for(slot + 1)
        for step, token in enumerate(tokens):
            ids = torch.zeros(B, 1, dtype=torch.long)
            pos = torch.full((B,), engine.cache.scratch_position)
            ids[slot, 0], pos[slot] = token, len(prompt) + step
            out.append(engine.runner.decode(ids, pos)[slot].float().clone())
    finally:
        engine.cache.free(slot)
    return torch.stack(out)


def medium_logits(steps: int) -> list[str]:
    path = _models.ensure_medium_llama()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (64,), generator=g).tolist()
    kwargs = dict(max_batch_size=1, max_seq_len=256)
    fp32 = zoo.load(path, dtype="float32", **kwargs)
    tokens = fp32.generate(prompt, max_new_tokens=steps, ignore_eos=True).token_ids
    ref = _step_logits(fp32, prompt, tokens[:-1])
    del fp32
    lines = ["## Random-weight ~1 B Llama: logits against fp32", "",
             f"A 64-token random prompt, then {steps - 1} decode steps fed the fp32 model's greedy tokens "
             f"({steps} logit rows of 32000). The first quantized variants run fp32 activations, so only the weights "
             "differ; bf16 (float weights) is the yardstick. The `bf16 run` rows are what a bf16 deployment computes: "
             "bf16 activations, and for int4 zoo's CPU decode kernel where the CPU has AVX512_VNNI (decode steps "
             "quantize the activations to int8 per 64 columns; the prefill row dequantizes). Random weights make the "
             "logits nearly flat, so argmax agreement here is a harsh measure (the trained tiny models above show the "
             "effect on text).", "",
             "| variant | cosine similarity (min / mean) | max abs diff (max over steps) | mean abs diff | argmax equal |",
             "| --- | --- | --- | --- | --- |"]
    variants = (("bf16", dict(dtype="bfloat16")), ("int8", dict(dtype="float32", quantize="int8")),
                ("int4 (groups of 64)", dict(dtype="float32", quantize="int4")),
                ("int8, bf16 run", dict(dtype="bfloat16", quantize="int8")),
                ("int4 (groups of 64), bf16 run", dict(dtype="bfloat16", quantize="int4")))
    for label, options in variants:
        model = zoo.load(path, **options, **kwargs)
        got = _step_logits(model, prompt, tokens[:-1])
        del model
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        diff = (got - ref).abs()
        argmax = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        lines.append(f"| {label} | {cos.min().item():.5f} / {cos.mean().item():.5f} | {diff.max().item():.4f} | "
                     f"{diff.mean().item():.4f} | {100 * argmax:.0f}% |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-medium", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    lines = [f"# Weight-only quantization: accuracy (CPU, {dt.date.today().isoformat()})", "",
             f"torch {torch.__version__}; `benches/quant_quality.py`.", ""]
    lines += tiny_agreement(args.new_tokens)
    if not args.skip_medium:
        lines += medium_logits(args.steps)
    _report.emit("\n".join(lines), os.path.join(args.out, f"quant_quality-cpu-{dt.date.today().isoformat()}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
