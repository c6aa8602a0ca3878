import os

# Compiled graphs are cached outside the clone, so a second run of the suite starts warm.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoints import build_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind) -> path of a tiny random-weight HF checkpoint, built once per session."""
    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = build_checkpoint(kind, str(tmp_path_factory.mktemp(kind)))
        return built[kind]

    return get
