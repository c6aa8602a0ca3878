"""n choices per prompt: the parameters of each sample, and keeping the best n of best_of.

OpenAI's `n` asks for n answers to one prompt; `best_of` draws best_of >= n of them and returns
the n the model found most likely (highest cumulative logprob). Sample j of a seeded request gets
seed + j (as vLLM does), so n seeded samples differ from each other and repeat across calls. The
samples share the prompt's prefill (the engine prefills identical prompts of one admission once).
"""
from __future__ import annotations

from dataclasses import replace

from zoo.engine.request import GenerationResult
from zoo.engine.sampling import INT64_MAX, INT64_MIN, SamplingParams
from zoo.errors import RequestError


def check_choices(n, best_of, stream: bool = False) -> int:
    """RequestError unless n >= 1 and best_of (None = n) >= n; returns how many samples to draw."""
    for name, value in (("n", n), ("best_of", best_of)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RequestError(f"{name} must be an int >= 1, got {value!r}")
    draws = n if best_of is None else best_of
    if draws < n:
        raise RequestError(f"best_of ({best_of}) must be >= n ({n})")
    if stream and draws > n:
        raise RequestError("best_of > n cannot be streamed: the best samples are known only at the end")
    return draws


def sample_params(params: SamplingParams, draws: int, keep: int) -> list[SamplingParams]:
    """The parameters of each of `draws` samples of one prompt. When only the best `keep` are
    returned, every sample needs its logprobs (to rank them), at least the chosen token's."""
    if draws > keep and params.logprobs is None:
        params = replace(params, logprobs=0)
    if params.seed is None or draws == 1 or not INT64_MIN <= params.seed <= INT64_MAX:
        return [params] * draws  # (a seed out of range is refused by the request's validation)
    span = INT64_MAX - INT64_MIN + 1
    return [replace(params, seed=(params.seed + j - INT64_MIN) % span + INT64_MIN) for j in range(draws)]


def keep_best(results: list[GenerationResult], n: int, draws: int, logprobs_asked: bool) -> list[GenerationResult]:
    """results: `draws` samples per prompt, prompt after prompt -> n per prompt (the most likely
    when draws > n), their `index` renumbered to prompt * n + choice as OpenAI numbers choices."""
    out = []
    for start in range(0, len(results), draws):
        samples = results[start:start + draws]
        if draws > n:
            samples = sorted(samples, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
        for j, r in enumerate(samples):
            r.index = start // draws * n + j
            if not logprobs_asked:
                r.logprobs = None
            out.append(r)
    return out
