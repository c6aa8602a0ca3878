"""Logprobs in OpenAI's two shapes: the completions API's parallel lists and the chat API's
per-token objects. A token is shown as its text (tokenizer.decode of the one id; a piece of a
multi-byte character decodes to U+FFFD, as in vLLM) or, without a tokenizer, as "token_id:N"."""
from __future__ import annotations

from collections.abc import Callable

from zoo.engine.sampling import TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out entirely gets this


def token_text_fn(tokenizer) -> Callable[[int], str]:
    """token id -> its text, remembered (the same tokens come back every step)."""
    seen: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in seen:
            seen[token_id] = tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"
        return seen[token_id]

    return text


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def completion_logprobs(entries: list[TokenLogprob | None], token_ids: list[int], text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} for these tokens (an entry of None: the
    prompt's first token, which has no logprob). top_logprobs hold the chosen token too, as OpenAI's
    legacy API does; text_offset counts characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries):
        piece = text(token_id)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(entry.logprob))
        top = {text(t): _lp(lp) for t, lp in entry.top}
        top.setdefault(piece, _lp(entry.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: list[TokenLogprob], text: Callable[[int], str]) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}."""
    def item(token_id: int, logprob: float) -> dict:
        piece = text(token_id)
        return {"token": piece, "logprob": _lp(logprob), "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}
