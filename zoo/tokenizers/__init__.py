"""The tokenizer a checkpoint ships, behind one small interface (zoo.tokenizers.base.Tokenizer).

Hugging Face tokenizer files load with AutoTokenizer, local files only (zoo.tokenizers.hf). A
first-generation Qwen folder (qwen.tiktoken) loads with tiktoken (zoo.tokenizers.qwen1).
"""
from __future__ import annotations

import os

from zoo.tokenizers.base import IncrementalDetokenizer, Tokenizer
from zoo.tokenizers.hf import HFTokenizer
from zoo.tokenizers.qwen1 import VOCAB_FILE as QWEN1_VOCAB_FILE
from zoo.tokenizers.qwen1 import Qwen1Tokenizer

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The folder's tokenizer; None when it has no tokenizer files (then prompts must be token ids)."""
    if os.path.isfile(os.path.join(model_dir, QWEN1_VOCAB_FILE)):
        return Qwen1Tokenizer.from_dir(model_dir)
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in HF_TOKENIZER_FILES):
        return HFTokenizer.from_dir(model_dir)
    return None


__all__ = ["HFTokenizer", "IncrementalDetokenizer", "Qwen1Tokenizer", "Tokenizer", "load_tokenizer"]
