"""What every tokenizer gives the engine, CLI and server (the Tokenizer protocol), and incremental
detokenization on top of it."""
from __future__ import annotations

from typing import Protocol

# End-of-turn tokens of the chat formats zoo knows; a chat reply stops at whichever the vocab has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class Tokenizer(Protocol):
    model_dir: str

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, messages: list[dict[str, str]], template: str | None = None) -> list[int]:
        """Messages -> prompt ids ending with the assistant's header; ChatTemplateError without a template."""

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn (besides EOS), e.g. Llama 3's <|eot_id|>."""


class IncrementalDetokenizer:
    """Text of the generated tokens so far, decoded with a few prompt tokens in front so that
    tokenizers that drop a leading space on the first token (sentencepiece) stay correct."""

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-self.CONTEXT:])
        self.prefix = tokenizer.decode(self.context)

    def text(self, output_ids: list[int]) -> str:
        full = self.tokenizer.decode(self.context + list(output_ids))
        return full[len(self.prefix):] if full.startswith(self.prefix) else self.tokenizer.decode(output_ids)
