"""The one table of what zoo can run: config.json `architectures[0]` -> everything zoo knows about it.

Adding an architecture is one modeling file (its class: graph entry points, weight plan, and how
its config.json reads) plus one row here. Nothing else in zoo lists architectures or families.

  family          short name; the Hugging Face model_type (llama, qwen2, qwen3; qwen = Qwen-1)
  model_class     the hand-adapted modeling class
  compile_config  stem of zoo/graphs/configs/<stem>.<device>.toml
  embedded        folder under zoo/embedded holding a tiny model of this family, if one ships
  traced_files    (traced_files()) the source files whose code runs inside the compiled graphs: the
                  graph-cache key hashes exactly these
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

from zoo.config import ModelConfig, read_config_json
from zoo.errors import ConfigError
from zoo.models.llama import LlamaForCausalLM
from zoo.models.qwen import QWenLMHeadModel
from zoo.models.qwen2 import Qwen2ForCausalLM
from zoo.models.qwen3 import Qwen3ForCausalLM

ZOO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_DIR = os.path.join(ZOO_DIR, "embedded")

# Files every model's graphs trace, relative to the zoo package: the shared layers, the config
# they read (rope), and the collectives of tensor-parallel layers. A backend may add its own.
COMMON_TRACED_FILES = ("config.py", "distributed/comm.py", "layers/")
BACKEND_TRACED_FILES = {"torchair": ("backends/npu.py",)}  # NpuAttentionOps replaces the attention ops


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    model_class: type
    compile_config: str
    embedded: str | None = None

    def traced_files(self, backend: str = "inductor", root: str = ZOO_DIR) -> list[str]:
        """Source files (relative to the zoo package at `root`) whose code is traced into this
        model's graphs on `backend`: its modeling class and the classes it derives from, then
        COMMON_TRACED_FILES and the backend's own."""
        files = set()
        for cls in self.model_class.__mro__:
            if cls.__module__.startswith("zoo."):
                files.add(os.path.relpath(inspect.getsourcefile(cls), ZOO_DIR))
        for entry in COMMON_TRACED_FILES + BACKEND_TRACED_FILES.get(backend, ()):
            if entry.endswith("/"):
                folder = os.path.join(root, entry)
                files.update(os.path.join(entry, f) for f in os.listdir(folder) if f.endswith(".py"))
            else:
                files.add(entry)
        return sorted(f.replace(os.sep, "/") for f in files)


SPECS = (
    ModelSpec("LlamaForCausalLM", "llama", LlamaForCausalLM, "llama", "tiny-llama"),
    ModelSpec("Qwen2ForCausalLM", "qwen2", Qwen2ForCausalLM, "qwen", "tiny-qwen2"),
    ModelSpec("Qwen3ForCausalLM", "qwen3", Qwen3ForCausalLM, "qwen"),
    ModelSpec("QWenLMHeadModel", "qwen", QWenLMHeadModel, "qwen"),  # first-generation Qwen (Qwen-7B-Chat)
)
BY_ARCHITECTURE = {s.architecture: s for s in SPECS}
BY_FAMILY = {s.family: s for s in SPECS}


def spec_for_family(family: str) -> ModelSpec:
    if family not in BY_FAMILY:
        raise ConfigError(f"unknown model family {family!r}; zoo knows: {', '.join(BY_FAMILY)}")
    return BY_FAMILY[family]


def embedded_model_path(family: str = "llama") -> str:
    """Folder of the tiny model that ships inside the package for `family`."""
    spec = spec_for_family(family)
    if spec.embedded is None:
        shipped = ", ".join(s.family for s in SPECS if s.embedded)
        raise ConfigError(f"no embedded model ships for family {family!r} (embedded: {shipped})")
    return os.path.join(EMBEDDED_DIR, spec.embedded)


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A config.json's contents -> ModelConfig; ConfigError naming the field zoo cannot run."""
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in BY_ARCHITECTURE:
        raise ConfigError(f"{source}: unsupported architecture {arch!r} in field 'architectures' "
                          f"(model_type={raw.get('model_type')!r}); zoo supports: {', '.join(sorted(BY_ARCHITECTURE))}")
    spec = BY_ARCHITECTURE[arch]
    fields = spec.model_class.hf_config_as_llama(raw, source)
    return ModelConfig.from_hf(fields, source, family=spec.family, architecture=arch, original=raw,
                               **spec.model_class.hf_config_flags(fields, source))


def read_config(model_dir: str) -> ModelConfig:
    """model_dir/config.json -> ModelConfig (FileNotFoundError / ConfigError naming the problem)."""
    raw, path = read_config_json(model_dir)
    return config_from_dict(raw, path)


def spec_for(config: ModelConfig) -> ModelSpec:
    return BY_ARCHITECTURE[config.architecture]
