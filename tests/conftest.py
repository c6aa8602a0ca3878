import os

# Compiled graphs are cached outside the clone, so a second run of the suite starts warm.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoints import build_checkpoint, to_qwen1_layout, write_tiny_qwen_tiktoken  # noqa: E402

ZEN = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
       "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
       "Readability counts. Special cases aren't special enough to break the rules.\n")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind) -> path of a tiny random-weight HF checkpoint, built once per session."""
    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            if kind == "qwen1":  # "qwen2_mha" renamed into the first-generation Qwen layout, with a tiktoken vocab
                built[kind] = to_qwen1_layout(get("qwen2_mha"), str(tmp_path_factory.mktemp(kind)))
                write_tiny_qwen_tiktoken(built[kind], ZEN * 4)
            else:
                built[kind] = build_checkpoint(kind, str(tmp_path_factory.mktemp(kind)))
        return built[kind]

    return get
