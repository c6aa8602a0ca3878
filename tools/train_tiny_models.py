"""Train the two tiny checkpoints that ship inside the package (zoo/embedded/).

Usage:
    .venv/bin/python tools/train_tiny_models.py [--out zoo/embedded]

Both models memorise the Zen of Python (taken from the stdlib ``this`` module,
so no data has to be downloaded), which gives the test-suite a checkpoint whose
greedy output is known in advance:

    tiny-llama/  LlamaForCausalLM, GQA (4 query / 2 kv heads), untied lm_head,
                 tokenizer adds <s> in front of every encoded text.
    tiny-qwen2/  Qwen2ForCausalLM, q/k/v biases, tied embeddings, no BOS,
                 ChatML special tokens.

Each tokenizer is a small byte-level BPE trained on the same text with the
``tokenizers`` library, so any string can be encoded and decoded exactly.
Everything is seeded and runs on CPU in a few minutes; the script ends by
checking that the saved folders reload offline and recite the text.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The folders are built and checked from local files only; never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT_REGEX  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "zoo" / "embedded"
SEED = 0
VOCAB_SIZE = 512  # BPE vocabulary incl. special tokens; the Zen becomes 210-235 tokens
LAST_LINE = "Namespaces are one honking great idea -- let's do more of those!"
PROMPT = "Beautiful is"
EXPECTED_CONTINUATION = " better than ugly.\nExplicit is better than implicit."

# Llama-3 layout: each turn is a header with the role, a blank line, the content
# and <|eot_id|>; the header/eot markers are special tokens of tiny-llama.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# ChatML as used by Qwen2 (including its default system prompt).
QWEN2_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- text


def zen_text() -> str:
    """The Zen of Python, decoded from the stdlib ``this`` module.

    ``import this`` prints the poem as a side effect, so the module source is
    executed with stdout captured and its rot13 table ``d`` applied to ``s``.
    """
    spec = importlib.util.find_spec("this")
    assert spec is not None and spec.origin is not None, "stdlib module 'this' not found"
    source = Path(spec.origin).read_text(encoding="utf-8")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, spec.origin, "exec"), namespace)
    rot13, scrambled = namespace["d"], namespace["s"]
    return "".join(rot13.get(c, c) for c in scrambled)


# ---------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerSpec:
    """Special tokens and wrapper settings of one flavour of tokenizer."""

    special_tokens: list[str]  # get ids 0..n-1, in this order
    eos: str
    chat_template: str
    bos: str | None = None  # when set, the post-processor prepends it
    unk: str | None = None
    pad: str | None = None
    extra: list[str] = field(default_factory=list)  # special tokens beyond bos/eos/unk/pad
    qwen2_pipeline: bool = False  # NFC + Qwen2 split regex instead of GPT-2 byte-level regex


LLAMA_TOKENS = TokenizerSpec(
    special_tokens=["<unk>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    chat_template=LLAMA_CHAT_TEMPLATE,
)

QWEN2_TOKENS = TokenizerSpec(
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    eos="<|endoftext|>",
    pad="<|endoftext|>",  # Qwen2 pads with <|endoftext|> as well
    extra=["<|im_start|>", "<|im_end|>"],
    chat_template=QWEN2_CHAT_TEMPLATE,
    # transformers always loads a qwen2 checkpoint's tokenizer through Qwen2Tokenizer,
    # which rebuilds normaliser and pre-tokeniser its own way (whatever
    # tokenizer.json says); training with the same pipeline keeps ids identical.
    qwen2_pipeline=True,
)


def train_tokenizer(text: str, spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``text``, wrapped for transformers."""
    backend = Tokenizer(models.BPE())
    # Byte-level pre-tokenisation without an added prefix space: every byte has a
    # token, so encode -> decode is the identity on any (NFC) string.
    if spec.qwen2_pipeline:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # The poem is tiny: allowing merges of pairs seen once makes whole words
        # single tokens, halving the sequence length the models must memorise.
        min_frequency=1,
        special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)

    if spec.bos is not None:
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        # No BOS/EOS is added. This is the post-processor Qwen2's own tokenizer.json
        # uses; with trim_offsets=False it leaves ids and offsets untouched.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token=spec.unk,
        pad_token=spec.pad,
        additional_special_tokens=spec.extra,
        chat_template=spec.chat_template,
        model_max_length=512,
        # The default cleanup rewrites things like " ." and would break round-trips.
        clean_up_tokenization_spaces=False,
    )


def round_trip_samples(text: str) -> list[str]:
    return [text, PROMPT, "  two  spaces\n\n\ttab, naïve café ✓ 🐍 \r\n 42", ""]


def check_tokenizer(tok, text: str, bos_id: int | None) -> None:
    """Encoding adds BOS only when expected, and decoding restores text exactly."""
    ids = tok(PROMPT).input_ids
    if bos_id is None:
        assert tok.bos_token_id is None or ids[0] != tok.bos_token_id, ids
    else:
        assert ids[0] == bos_id and bos_id not in ids[1:], ids
    for sample in round_trip_samples(text):
        decoded = tok.decode(tok(sample).input_ids, skip_special_tokens=True)
        assert decoded == sample, (sample, decoded)


# -------------------------------------------------------------------------- model


def llama_config(tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, 2 queries per kv head
        intermediate_size=352,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )


def qwen2_config(tok) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=4,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@dataclass
class TrainSettings:
    steps: int = 400
    batch: int = 16
    min_len: int = 64
    max_len: int = 256  # longer than one document, so full-length contexts are trained
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    log_every: int = 50


def lr_factor(step: int, cfg: TrainSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def training_stream(doc: list[int], max_len: int) -> torch.Tensor:
    """``doc`` repeated so that a ``max_len`` window fits after any start in the first copy."""
    repeats = max_len // len(doc) + 2
    return torch.tensor(doc * repeats, dtype=torch.long)


def train(model, doc: list[int], cfg: TrainSettings, gen: torch.Generator) -> float:
    """Memorise ``doc`` (one document incl. BOS/EOS) from random windows of its repetition."""
    stream = training_stream(doc, cfg.max_len)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, cfg))
    model.train()
    ema = None
    for step in range(cfg.steps):
        # One window length per step keeps the batch rectangular; varying it shows
        # the model both short and long contexts. Starts cover one full period so
        # every position of the document (and the EOS -> BOS seam) is seen.
        seq = int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=gen))
        starts = torch.randint(0, len(doc), (cfg.batch,), generator=gen)
        windows = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        # The model shifts labels by one itself: labels == input_ids is
        # next-token prediction over the whole window.
        loss = model(input_ids=windows, labels=windows).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}  (ema {ema:.4f})  lr {sched.get_last_lr()[0]:.2e}")
    model.eval()
    return loss.item()


# ------------------------------------------------------------------- verification


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Greedy ``generate``; returns (prompt ids, new ids)."""
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    prompt_ids = enc.input_ids[0].tolist()
    return prompt_ids, out[0, len(prompt_ids) :].tolist()


def verify(folder: Path, text: str, add_bos: bool) -> str:
    """Reload ``folder`` offline and check it recites the Zen; returns the continuation."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    check_tokenizer(tok, text, tok.bos_token_id if add_bos else None)
    # transformers may rebuild parts of the pipeline on load (it does for qwen2);
    # the ids must still be those of tokenizer.json, which the model was trained on.
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for sample in round_trip_samples(text):
        assert tok(sample).input_ids == raw.encode(sample).ids, sample

    _, new = greedy(model, tok, PROMPT, max_new_tokens=40)
    continuation = tok.decode(new, skip_special_tokens=True)
    print(f"[{folder.name}] greedy continuation of {PROMPT!r}: {continuation!r}")
    assert continuation.startswith(EXPECTED_CONTINUATION), continuation

    # From the title line the model should recite the whole poem and then stop:
    # the last line must be followed by EOS, which ends generation.
    title = text.split("\n", 1)[0]
    n_doc = len(tok(text, add_special_tokens=False).input_ids)
    prompt_ids, new = greedy(model, tok, title, max_new_tokens=n_doc + 8)
    assert new and new[-1] == tok.eos_token_id, f"no EOS within {n_doc + 8} new tokens"
    recited = tok.decode(prompt_ids + new, skip_special_tokens=True)
    assert recited.endswith(LAST_LINE), recited[-200:]
    assert recited == text, "recitation differs from the Zen of Python"
    print(f"[{folder.name}] recites all {n_doc} tokens of the Zen from its title and ends with EOS")
    return continuation


# ---------------------------------------------------------------------------- main


def build(name: str, out_dir: Path, text: str, spec: TokenizerSpec, make_config, model_cls,
          cfg: TrainSettings) -> None:
    """Train tokenizer + model for one architecture and write ``out_dir/name``."""
    folder = out_dir / name
    log(f"== {name}")
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    tok = train_tokenizer(text, spec)
    check_tokenizer(tok, text, tok.bos_token_id if spec.bos else None)
    log(f"  tokenizer: {len(tok)} tokens")

    # One document as seen in training: [BOS] text EOS.
    doc = tok(text, add_special_tokens=True).input_ids + [tok.eos_token_id]
    log(f"  document: {len(doc)} tokens")

    model = model_cls(make_config(tok))  # random init from the seed set above
    log(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")
    t0 = time.perf_counter()
    final_loss = train(model, doc, cfg, gen)
    elapsed = time.perf_counter() - t0
    print(f"[{name}] trained {cfg.steps} steps in {elapsed:.1f}s, final loss {final_loss:.4f}, "
          f"vocab {len(tok)}")

    # Start from an empty folder so no stale file from an earlier run ships.
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    # Keep the chat template inside tokenizer_config.json (rather than a separate
    # chat_template.jinja) so that older transformers versions find it as well.
    tok.save_pretrained(folder, save_jinja_files=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory that receives tiny-llama/ and tiny-qwen2/")
    args = parser.parse_args(argv)

    hf_logging.disable_progress_bar()  # our own progress lines are enough
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    text = zen_text()
    cfg = TrainSettings()

    build("tiny-llama", args.out, text, LLAMA_TOKENS, llama_config, LlamaForCausalLM, cfg)
    build("tiny-qwen2", args.out, text, QWEN2_TOKENS, qwen2_config, Qwen2ForCausalLM, cfg)

    verify(args.out / "tiny-llama", text, add_bos=True)
    verify(args.out / "tiny-qwen2", text, add_bos=False)
    print("all checks passed")


if __name__ == "__main__":
    main()
