"""GGUF copies of a bench checkpoint for the llama.cpp peer (benches/_worker.py's llamacpp_* variants).

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from its source tree: pip installs
`llama-cpp-python` from a source package whose `vendor/llama.cpp` holds the converter (and the
`gguf-py` it imports). Get the tree once with

    pip download --no-deps llama-cpp-python==0.3.36 -d /tmp/llamacpp && tar xzf /tmp/llamacpp/*.tar.gz -C /tmp/llamacpp

and pass `--llamacpp-src /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp` (or set
$ZOO_LLAMA_CPP_SRC). The bench's random-weight models have no tokenizer; the converter then takes
llama.cpp's built-in Llama SentencePiece vocabulary (models/ggml-vocab-llama-spm.gguf, 32000
tokens), which only names the token ids the bench feeds. bf16 and q8_0 come out of the converter;
q4_0 is quantized from the bf16 file by llama.cpp (`llama_model_quantize`). Files are kept under
~/.cache/zoo/bench-gguf/.

    python benches/_gguf.py --model DIR --outtype q8_0 --llamacpp-src SRC    # -> prints the file
"""
from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys

OUT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "zoo", "bench-gguf")
CONVERTER_TYPES = ("bf16", "q8_0", "f32")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def source_tree(explicit: str | None) -> str:
    src = explicit or os.environ.get("ZOO_LLAMA_CPP_SRC")
    if not src or not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        raise FileNotFoundError(f"llama.cpp source tree with convert_hf_to_gguf.py not found (got {src!r}); "
                                "see benches/_gguf.py for how to get it, then pass --llamacpp-src")
    return src


def ensure_gguf(model_dir: str, outtype: str, llamacpp_src: str | None) -> str:
    """The GGUF file of model_dir in outtype (bf16, q8_0, q4_0), converted once."""
    name = os.path.basename(os.path.normpath(model_dir))
    out = os.path.join(OUT_ROOT, f"{name}-{outtype}.gguf")
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(os.path.join(model_dir, "config.json")):
        return out
    os.makedirs(OUT_ROOT, exist_ok=True)
    tmp = out + ".part"
    if outtype in CONVERTER_TYPES:
        # the converter in a child process: it imports its own gguf-py and registers every architecture
        subprocess.run([sys.executable, os.path.abspath(__file__), "--convert", "--model", model_dir, "--outtype",
                        outtype, "--out", tmp, "--llamacpp-src", source_tree(llamacpp_src)], check=True)
    elif outtype == "q4_0":
        _quantize(ensure_gguf(model_dir, "bf16", llamacpp_src), tmp, "LLAMA_FTYPE_MOSTLY_Q4_0")
    else:
        raise ValueError(f"unknown GGUF type {outtype!r} (bf16, q8_0, q4_0)")
    os.replace(tmp, out)
    return out


def _quantize(src: str, dst: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({ftype}) failed")


def _convert(model_dir: str, outtype: str, out: str, src: str) -> None:
    """Run llama.cpp's converter in this process; without a tokenizer in model_dir, Llama models
    take the built-in SentencePiece vocabulary (the converter's _set_vocab_builtin)."""
    sys.path.insert(0, src)  # the converter finds models/ggml-vocab-*.gguf under sys.path[0]
    sys.path.insert(1, os.path.join(src, "gguf-py"))
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        from conversion.llama import LlamaModel

        LlamaModel.set_vocab = lambda self: self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    runpy.run_path(os.path.join(src, "convert_hf_to_gguf.py"), run_name="__main__")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--llamacpp-src")
    ap.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.convert:
        _convert(args.model, args.outtype, args.out, args.llamacpp_src)
    else:
        print(ensure_gguf(args.model, args.outtype, args.llamacpp_src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
