"""The tokenizer a checkpoint ships, behind one small interface the engine, CLI and server use.

Hugging Face tokenizer files (tokenizer.json, tokenizer.model, ...) load with AutoTokenizer, local
files only. A first-generation Qwen folder (qwen.tiktoken) loads with tiktoken instead
(zoo.qwen.tokenization_qwen1). Both give encode / decode / eos_token_id and chat templating.
"""
from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
QWEN1_TOKENIZER_FILE = "qwen.tiktoken"

# End-of-turn tokens of the chat formats zoo knows; a chat reply stops at whichever the vocab has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class ChatTemplateError(ValueError):
    """The model's tokenizer has no chat template, so messages cannot be turned into a prompt."""


class Tokenizer:
    def __init__(self, hf_tokenizer, model_dir: str = ""):
        self.hf = hf_tokenizer
        self.model_dir = model_dir

    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer | None":
        """None when the folder has no tokenizer files (then prompts must be token ids)."""
        if os.path.isfile(os.path.join(model_dir, QWEN1_TOKENIZER_FILE)):
            from zoo.qwen.tokenization_qwen1 import Qwen1Tokenizer

            return Qwen1Tokenizer.from_dir(model_dir)
        if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(model_dir, local_files_only=True), model_dir)
        except Exception as e:  # transformers raises many types for a broken tokenizer
            raise ValueError(f"cannot load the tokenizer in {model_dir!r}: {e}") from None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    # ---- chat --------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]], template: str | None = None) -> list[int]:
        """[{"role": "system" | "user" | "assistant", "content": str}, ...] -> prompt token ids,
        ending with the header of the assistant's reply (add_generation_prompt). `template` (a
        Jinja chat template) replaces the tokenizer's own."""
        if template is None and not self.has_chat_template:
            raise ChatTemplateError(f"the tokenizer in {self.model_dir!r} has no chat template "
                                    "(no 'chat_template' in tokenizer_config.json or chat_template.jinja); "
                                    "use plain prompts instead of chat")
        encoded = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              chat_template=template)
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return list(ids)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn (besides EOS), e.g. Llama 3's <|eot_id|>."""
        vocab = self.hf.get_vocab()
        return tuple(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)


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
