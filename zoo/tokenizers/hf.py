"""Tokenizers that ship as Hugging Face tokenizer files (tokenizer.json, tokenizer.model, ...),
loaded with AutoTokenizer from local files only."""
from __future__ import annotations

from zoo.errors import ChatTemplateError
from zoo.tokenizers.base import END_OF_TURN_TOKENS


class HFTokenizer:
    def __init__(self, hf_tokenizer, model_dir: str = ""):
        self.hf = hf_tokenizer
        self.model_dir = model_dir

    @classmethod
    def from_dir(cls, model_dir: str) -> "HFTokenizer":
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
