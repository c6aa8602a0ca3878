"""First-generation Qwen's tokenizer: a tiktoken byte-level BPE (qwen.tiktoken) plus special tokens.

The Hub ships it as remote code (QWenTokenizer); zoo rebuilds it from the same file with the
`tiktoken` package, behind the interface of zoo.tokenizers.base.Tokenizer: encode / decode /
eos_token_id / apply_chat_template / chat_stop_token_ids.

  qwen.tiktoken      one "<base64 token bytes> <rank>" per line: the mergeable ranks
  special tokens     <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|> ... <|extra_204|>,
                     numbered from len(mergeable ranks) on, in that order

Like QWenTokenizer, text is NFC-normalized before encoding and special tokens written in a plain
prompt are encoded as special tokens. Chat messages are not: their contents are encoded as text,
so a message cannot forge a turn boundary.
"""
from __future__ import annotations

import base64
import os
import unicodedata

from zoo.errors import ChatTemplateError

VOCAB_FILE = "qwen.tiktoken"
# the pre-tokenizer split of QWenTokenizer
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen-7B-Chat's make_context puts first


def read_mergeable_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    return ranks


class Qwen1Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], model_dir: str = ""):
        import tiktoken

        self.model_dir = model_dir
        self.special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS, start=len(mergeable_ranks))}
        self.encoding = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_ids)
        self.first_special_id = len(mergeable_ranks)

    @classmethod
    def from_dir(cls, model_dir: str) -> "Qwen1Tokenizer":
        path = os.path.join(model_dir, VOCAB_FILE)
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise ValueError(f"{path!r} is a Qwen-1 tiktoken vocabulary; reading it needs the 'tiktoken' "
                             "package (pip install tiktoken)") from None
        try:
            return cls(read_mergeable_ranks(path), model_dir)
        except ValueError as e:
            raise ValueError(f"cannot load the tokenizer in {model_dir!r}: {e}") from None

    @property
    def eos_token_id(self) -> int:
        return self.special_ids[ENDOFTEXT]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def _encode_text(self, text: str) -> list[int]:
        """Special-token spellings inside `text` stay plain text."""
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if i < self.first_special_id], errors="replace")

    # ---- chat: Qwen-1's ChatML format, built in (its tokenizer has no Jinja template) ----------
    @property
    def has_chat_template(self) -> bool:
        return True

    def apply_chat_template(self, messages: list[dict[str, str]], template: str | None = None) -> list[int]:
        """<|im_start|>{role}\\n{content}<|im_end|>\\n per message (a default system message first
        when there is none), then <|im_start|>assistant\\n — token for token what Qwen-7B-Chat's
        make_context builds. A Jinja `template` replaces the format (rendered, then encoded with
        its special tokens)."""
        if template is not None:
            return self._apply_jinja(messages, template)
        im_start, im_end = self.special_ids[IM_START], self.special_ids[IM_END]
        newline = self._encode_text("\n")
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        ids: list[int] = []
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ChatTemplateError(f"a chat message needs a string 'role' and 'content', got {message!r}")
            ids += [im_start, *self._encode_text(role), *newline, *self._encode_text(content), im_end, *newline]
        return ids + [im_start, *self._encode_text("assistant"), *newline]

    def _apply_jinja(self, messages, template: str) -> list[int]:
        import jinja2.sandbox

        text = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=ENDOFTEXT)
        return self.encode(text)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return (self.special_ids[IM_END],)
