"""Compiled graphs kept on disk, one directory per cache key.

The key covers everything that changes compiled code: a hash of every source file traced into the
graphs (the model registry lists them per model and backend: zoo.models.ModelSpec.traced_files —
an edit to the forward gives a new key, unlike torchair's cache_compile, whose key ignores forward
code, while an edit to code that only drives the graphs does not), the compile config, dtype,
buckets, KV cache geometry, model config, device, and the torch / Python / zoo versions.

The directory is inductor's cache dir (TORCHINDUCTOR_CACHE_DIR) while zoo compiles into it.
Inductor's FX-graph and AOTAutograd caches then turn the next process's compile into a cache
load. After each compile, zoo writes a manifest with the size and sha256 of every file in the
directory. On open, it re-checks the manifest. A missing manifest (an interrupted compile, a
foreign directory), other key fields, a missing, changed or truncated file, or an unexpected file
all mean the directory is wiped and rebuilt. A damaged entry costs one cold compile; it never
crashes the load or feeds inductor bytes zoo did not write.

Inductor also checks, in every new process, which CPU vector ISAs it can build for: it compiles a
probe per ISA and dlopens each in a child Python (~0.8 s per process here, a quarter of a warm
start). The first compile into a directory records the outcome (cpu_isa.json, checksummed like
the rest); when every ISA the CPU advertises passed, later processes compile and load with
`cpp.vec_isa_ok=True`, which skips the probes and selects the same ISAs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil

import torch

from zoo._version import __version__
from zoo.log import log
from zoo.models.registry import ZOO_DIR

MANIFEST = "zoo-manifest.json"
ISA_RECORD = "cpu_isa.json"
FORMAT_VERSION = 2  # 2: the source hash covers every traced file (registry list)
_SKIP_DIRS = {"locks"}  # inductor's lock files come and go


def source_hash(files: list[str], root: str = ZOO_DIR) -> str:
    """sha256 over the named source files (paths relative to the zoo package at `root`), names included."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def cache_key_fields(traced_files: list[str], model_config: dict, compile_fingerprint: dict, dtype: torch.dtype,
                     buckets, cache_shape: tuple, device: torch.device, root: str = ZOO_DIR) -> dict:
    """The graph-cache key's fields; `root` is the zoo package the traced files are read from."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {
        "format": FORMAT_VERSION,
        "traced_source": source_hash(traced_files, root),
        "model_config": hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest(),
        "compile_config": compile_fingerprint,
        "dtype": str(dtype),
        # which graphs exist, with static or dynamic lengths (lists, as the manifest's JSON has them)
        "buckets": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(buckets).items()},
        "kv_cache_shape": list(cache_shape),
        "device": f"{device.type}:{device_name}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "zoo": __version__,
    }


class GraphCache:
    def __init__(self, root: str, fields: dict):
        self.fields = fields
        self.key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = os.path.join(root, "graphs", self.key)
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        self._lock_path = self.dir + ".lock"
        with self._locked():
            self.status = self._open()
            self.graphs = self._recorded_graphs()  # the graphs compiled into this entry so far

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock per key: a second process waits for the first one's compile, then hits."""
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open(self) -> str:
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir)
            return "cold"
        problem = self.verify()
        if problem is None:
            return "warm"
        log(f"graph cache {self.dir}: {problem}; rebuilding it")
        shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        return f"rebuilt ({problem})"

    def _files(self) -> list[str]:
        found = []
        for root, dirs, files in os.walk(self.dir):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            found += [os.path.relpath(os.path.join(root, f), self.dir) for f in files if f != MANIFEST]
        return sorted(found)

    def verify(self) -> str | None:
        """None when the directory is exactly what zoo sealed for this key, else what is wrong."""
        path = os.path.join(self.dir, MANIFEST)
        if not os.path.isfile(path):
            return "no manifest (an interrupted compile or a foreign directory)"
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            recorded = manifest["files"]
            fields = manifest["fields"]
        except (ValueError, KeyError, TypeError):
            return "unreadable manifest"
        if fields != self.fields:
            return "the manifest belongs to another key"
        for rel in self._files():
            if rel not in recorded:
                return f"unexpected file {rel}"
        for rel, (size, sha) in recorded.items():
            file = os.path.join(self.dir, rel)
            if not os.path.isfile(file):
                return f"missing file {rel}"
            if os.path.getsize(file) != size or _sha256(file) != sha:
                return f"file {rel} does not match its checksum"
        return None

    def _recorded_graphs(self) -> set[str]:
        try:
            with open(os.path.join(self.dir, MANIFEST), encoding="utf-8") as f:
                return set(json.load(f).get("graphs", []))
        except (OSError, ValueError, AttributeError, TypeError):
            return set()

    def has(self, graph: str) -> bool:
        """Whether `graph` (e.g. "prefill b1 s32") was compiled into this entry, so its first call
        loads it rather than compiling it."""
        return graph in self.graphs

    def seal(self) -> None:
        """Record every file now in the directory, and the graphs compiled into it (after each compile)."""
        files = {rel: [os.path.getsize(os.path.join(self.dir, rel)), _sha256(os.path.join(self.dir, rel))]
                 for rel in self._files()}
        self.graphs |= self._recorded_graphs()  # another process may have added some meanwhile
        tmp = os.path.join(self.dir, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fields": self.fields, "files": files, "graphs": sorted(self.graphs)}, f, indent=1,
                      sort_keys=True)
        os.replace(tmp, os.path.join(self.dir, MANIFEST))  # atomic: never a half-written manifest

    @contextlib.contextmanager
    def compiling(self, graph: str | None = None):
        """Compile `graph` into this directory (as inductor's cache dir), under the key's lock; record
        it and seal after."""
        with self._locked():
            previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.dir
            try:
                probes = (_cpu_isa_probed_once(self.dir) if self.fields.get("device", "").startswith("cpu:")
                          else contextlib.nullcontext())
                with probes:
                    yield
                if graph is not None:
                    self.graphs.add(graph)
                self.seal()
            finally:
                if previous is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@contextlib.contextmanager
def _cpu_isa_probed_once(cache_dir: str):
    """Compile with inductor's CPU-ISA probes skipped when this directory's first compile found
    every ISA the CPU advertises buildable (see the module docstring); else leave inductor alone.
    Both the first and the later compiles run under the same setting, so the setting (part of
    inductor's own cache key) never makes a warm process miss."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64") or inductor_config.cpp.vec_isa_ok is not None:
        yield  # inductor probes only x86 this way; a user's own setting wins
        return
    cpu_flags = cpu_vec_isa.x86_isa_checker()
    advertised = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                  if all(flag in cpu_flags for flag in str(isa).split())]
    path = os.path.join(cache_dir, ISA_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("advertised") != advertised:
        buildable = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]  # the probes, once
        record = {"advertised": advertised, "buildable": buildable}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f)
    if record["buildable"] == advertised:
        with inductor_config.patch({"cpp.vec_isa_ok": True}):
            yield
    else:
        yield


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
