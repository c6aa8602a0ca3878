"""The tokenizer a checkpoint ships (AutoTokenizer, local files only) and incremental detokenizing."""
from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer | None":
        """None when the folder has no tokenizer files (then prompts must be token ids)."""
        if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
        except Exception as e:  # transformers raises many types for a broken tokenizer
            raise ValueError(f"cannot load the tokenizer in {model_dir!r}: {e}") from None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


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
