"""Sampling beyond temperature / top-k / top-p: penalties, min_p, logit_bias, min_tokens, logprobs,
prompt logprobs and n / best_of.

The logits processing is checked on fixed logits against small reference implementations written
here plainly (one row, one token at a time), and against transformers' logits processors where one
exists (repetition penalty, min_p); logprobs against transformers' log_softmax of its own logits on
the same weights."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

import zoo
from zoo import RequestError
from zoo.engine.sampling import LogitsState, apply_penalties, filter_logits, token_logprobs

PROMPTS = [[3, 17, 42, 99, 7], [5, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
V = 50


@pytest.fixture(scope="module")
def model(checkpoint):
    return zoo.load(checkpoint("llama3_gqa"), max_batch_size=4, max_seq_len=64, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint("llama3_gqa"), dtype=torch.float32).eval()


# ---- the processing, on fixed logits ---------------------------------------------------------------
def _state(rows: int, prompts: list[list[int]], outputs: list[list[int]], presence, frequency, repetition,
           bias: list[dict]) -> LogitsState:
    state = LogitsState.empty(rows, V, "cpu")
    for r in range(rows):
        for t in outputs[r]:
            state.output_counts[r, t] += 1
        state.prompt_seen[r, prompts[r]] = True
        for t, b in bias[r].items():
            state.bias[r, t] = b
    state.presence[:] = torch.tensor(presence)
    state.frequency[:] = torch.tensor(frequency)
    state.repetition[:] = torch.tensor(repetition)
    return state


def _reference_penalties(logits: list[float], prompt: list[int], output: list[int], presence: float,
                         frequency: float, repetition: float, bias: dict) -> list[float]:
    """vLLM's order, one token at a time: bias, then repetition (prompt + output), then frequency
    and presence (output only)."""
    out = []
    for t, x in enumerate(logits):
        x += bias.get(t, 0.0)
        if t in prompt or t in output:
            x = x / repetition if x > 0 else x * repetition
        count = output.count(t)
        x -= frequency * count + presence * (count > 0)
        out.append(x)
    return out


def test_penalties_and_bias_match_a_plain_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    prompts = [[1, 2, 3], [4, 4, 5], [6]]
    outputs = [[2, 7, 7, 7, 9], [], [6, 6, 10]]
    presence, frequency, repetition = [0.5, -1.0, 2.0], [0.3, 0.0, -0.7], [1.3, 0.8, 1.0]
    bias = [{0: 5.0, 7: -3.0}, {}, {10: 100.0}]
    state = _state(3, prompts, outputs, presence, frequency, repetition, bias)
    got = apply_penalties(logits, state, torch.arange(3))
    for r in range(3):
        want = _reference_penalties(logits[r].tolist(), prompts[r], outputs[r], presence[r], frequency[r],
                                    repetition[r], bias[r])
        assert got[r].tolist() == pytest.approx(want, abs=1e-5)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(2, V) * 4
    seen = [[1, 2, 3, 9, 9], [0, 40, 41]]  # prompt + output, as transformers sees input_ids
    state = _state(2, [s[:2] for s in seen], [s[2:] for s in seen], [0.0, 0.0], [0.0, 0.0], [1.7, 1.7],
                   [{}, {}])
    got = apply_penalties(logits, state, torch.arange(2))
    for r in range(2):
        want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seen[r]]), logits[r:r + 1].clone())
        torch.testing.assert_close(got[r:r + 1], want)


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 1.5)])
def test_min_p_keeps_the_tokens_transformers_keeps(min_p, temperature):
    torch.manual_seed(2)
    logits = torch.randn(4, V) * 3
    ones = torch.ones(4)
    got = filter_logits(logits, ones * temperature, torch.full((4,), V), ones, torch.full((4,), min_p))
    want = MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), logits / temperature)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_token_logprobs_are_log_softmax_with_the_top_alternatives():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    tokens = torch.tensor([4, 0, 49])
    chosen, top_v, top_i = token_logprobs(logits, tokens, 5)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, ref[torch.arange(3), tokens])
    for r in range(3):
        order = sorted(range(V), key=lambda t: -ref[r, t].item())[:5]
        assert top_i[r].tolist() == order
        assert top_v[r].tolist() == pytest.approx(ref[r, order].tolist())


# ---- in the engine ---------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(model):
    plain = model.generate(PROMPTS[0], max_new_tokens=8).token_ids
    forced = model.generate(PROMPTS[0], max_new_tokens=8, logit_bias={77: 100.0}).token_ids
    assert forced == [77] * 8
    banned = model.generate(PROMPTS[0], max_new_tokens=8, logit_bias={t: -100.0 for t in set(plain)}).token_ids
    assert not set(banned) & set(plain)


def test_min_tokens_holds_back_stop_tokens(model):
    # the bias makes token 77 the greedy choice at every step; it is also a stop token
    kw = dict(max_new_tokens=12, logit_bias={77: 100.0}, stop_token_ids=[77])
    assert model.generate(PROMPTS[0], **kw).token_ids == [77]
    out = model.generate(PROMPTS[0], min_tokens=5, **kw)
    assert len(out.token_ids) == 6 and out.token_ids[-1] == 77 and 77 not in out.token_ids[:5]
    assert out.finish_reason == "stop"


def test_penalties_change_greedy_output_and_are_batch_independent(model):
    plain = model.generate(PROMPTS[0], max_new_tokens=16).token_ids
    kw = dict(max_new_tokens=16, frequency_penalty=2.0, presence_penalty=1.0, repetition_penalty=1.5)
    alone = model.generate(PROMPTS[0], **kw).token_ids
    assert alone != plain
    # batched with requests using other settings (and none), the result stays the same
    batch = model.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], max_new_tokens=16, frequency_penalty=2.0,
                           presence_penalty=1.0, repetition_penalty=1.5)
    assert batch[1].token_ids == alone
    # the same penalties as a reference loop: greedy over penalized full-model logits
    sampled = dict(temperature=0.9, top_p=0.9, min_p=0.05, seed=7, **kw)
    assert model.generate(PROMPTS[0], **sampled).token_ids == model.generate(PROMPTS[:2], **sampled)[0].token_ids


def test_penalized_greedy_matches_a_reference_loop_over_transformers_logits(model, hf_model):
    kw = dict(frequency_penalty=0.8, presence_penalty=0.4, repetition_penalty=1.3, logit_bias={5: 2.0})
    got = model.generate(PROMPTS[2], max_new_tokens=10, **kw).token_ids
    ids, out = list(PROMPTS[2]), []
    for _ in range(10):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
        x = _reference_penalties(logits.tolist(), PROMPTS[2], out, 0.4, 0.8, 1.3, {5: 2.0})
        token = max(range(len(x)), key=x.__getitem__)
        out.append(token)
        ids.append(token)
    assert got == out


def test_logprobs_match_transformers_log_softmax(model, hf_model):
    out = model.generate(PROMPTS[0], max_new_tokens=8, logprobs=5)
    assert [t.token_id for t in out.logprobs] == out.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([PROMPTS[0] + out.token_ids])).logits[0]
    ref = logits.log_softmax(-1)[len(PROMPTS[0]) - 1:-1]  # position i predicts token i + 1
    for step, entry in enumerate(out.logprobs):
        assert entry.logprob == pytest.approx(ref[step, entry.token_id].item(), abs=1e-4)
        top = ref[step].topk(5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))
    assert model.generate(PROMPTS[0], max_new_tokens=8).logprobs is None


def test_prompt_logprobs_match_transformers(model, hf_model):
    out = model.generate(PROMPTS[2], max_new_tokens=2, prompt_logprobs=3)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPTS[2]])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPTS[2])
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token_id == PROMPTS[2][i]
        assert entry.logprob == pytest.approx(ref[i - 1, PROMPTS[2][i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[i - 1].topk(3).indices.tolist()
    # the generated tokens are those of a request without prompt logprobs
    assert out.token_ids == model.generate(PROMPTS[2], max_new_tokens=2).token_ids


def test_streamed_logprobs_are_the_results(model):
    stream = model.stream(PROMPTS[:2], max_new_tokens=6, logprobs=2, temperature=0.8, seed=3)
    events = list(stream)
    for result in stream.results:
        mine = [e for e in events if e.index == result.index]
        assert [t for e in mine for t in e.logprobs] == result.logprobs
        assert [t for e in mine for t in e.token_ids] == result.token_ids


# ---- n and best_of ---------------------------------------------------------------------------------
def test_n_samples_share_one_prefill_and_differ(model, monkeypatch):
    calls = []
    prefill = model.engine.runner.prefill
    monkeypatch.setattr(model.engine.runner, "prefill", lambda prompts, slots, starts: calls.append(len(prompts))
                        or prefill(prompts, slots, starts))
    outs = model.generate(PROMPTS[0], n=3, max_new_tokens=8, temperature=1.0, seed=11)
    assert calls == [1]  # three slots, one prefill row
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    again = model.generate(PROMPTS[0], n=3, max_new_tokens=8, temperature=1.0, seed=11)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    # sample j of seed s is the single request with seed s + j
    assert outs[2].token_ids == model.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=13).token_ids


def test_n_greedy_over_several_prompts_numbers_choices_like_openai(model):
    outs = model.generate(PROMPTS[:2], n=2, max_new_tokens=5)
    assert [o.index for o in outs] == [0, 1, 2, 3]
    solo = [model.generate(p, max_new_tokens=5).token_ids for p in PROMPTS[:2]]
    assert [o.token_ids for o in outs] == [solo[0], solo[0], solo[1], solo[1]]


def test_best_of_keeps_the_most_likely_samples(model):
    drawn = model.generate(PROMPTS[1], n=5, max_new_tokens=6, temperature=1.2, seed=5, logprobs=0)
    best = model.generate(PROMPTS[1], n=2, best_of=5, max_new_tokens=6, temperature=1.2, seed=5)
    ranked = sorted(drawn, key=lambda r: r.cumulative_logprob, reverse=True)[:2]
    assert [b.token_ids for b in best] == [r.token_ids for r in ranked]
    assert [b.index for b in best] == [0, 1] and all(b.logprobs is None for b in best)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"n must be an int >= 1"),
    ({"n": 3, "best_of": 2}, r"best_of \(2\) must be >= n \(3\)"),
    ({"logprobs": 21}, r"logprobs must be an int in \[0, 20\]"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"presence_penalty": 3.0}, r"presence_penalty must be a number in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0"),
    ({"logit_bias": {100000: 1.0}}, r"logit_bias keys must be token ids in \[0, 256\)"),
    ({"logit_bias": {3: math.inf}}, r"logit_bias values must be numbers in \[-100, 100\]"),
    ({"min_tokens": 100}, r"min_tokens must be an int in \[0, max_new_tokens=64\]"),
])
def test_bad_sampling_options_are_refused_and_the_model_stays_usable(model, kwargs, message):
    with pytest.raises(RequestError, match=message):
        model.generate(PROMPTS[0], **kwargs)
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['top_q'\]"):
        model.generate(PROMPTS[0], top_q=0.5)
    assert len(model.generate(PROMPTS[0], max_new_tokens=3).token_ids) == 3
    assert not model.engine.running and not model.engine.waiting
