"""Command-line options that can be checked without a model are refused at once: one `error:` line
naming the flag, exit code 2, and torch is never imported (it takes seconds to import here)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = {
    "generate": "from zoo.entrypoints.generate import main; run = lambda a: main('llama', a)",
    "serve": "from zoo.serve.__main__ import main as run",
    "export": "from zoo.entrypoints.export import main as run",
    "pd": "from zoo.pd.cli import main as run",
}


def run_without_torch(entry: str, args: list[str]) -> tuple[int, str, bool]:
    """(exit code, stderr, whether torch got imported) of one CLI run in a fresh interpreter."""
    code = (f"import sys\n{ENTRY[entry]}\n"
            f"try:\n    rc = run({args!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    return out.returncode, "\n".join(lines[:-1]), lines[-1] == "TORCH_IMPORTED"


CASES = [
    ("generate", ["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got 0"),
    ("generate", ["--threads", "0"], "error: --threads must be an int >= 1, got 0"),
    ("generate", ["--tp", "0"], "error: --tp must be an int >= 1, got 0"),
    ("generate", ["--max-seq-len", "1"], "error: --max-seq-len must be an int >= 2, got 1"),
    ("generate", ["--max-new-tokenz", "3"], "did you mean --max-new-tokens"),
    ("generate", ["--model-path", "meta-llama/Llama-3.2-1B"], "looks like a Hugging Face Hub id, and zoo never downloads"),
    ("generate", ["--model-path", "/nonexistent/folder"], "error: --model-path '/nonexistent/folder': no such folder"),
    ("generate", ["--compiled", "--cache-dir", "{file}/graphs"], "is a file, not a folder"),
    ("generate", ["--inductor-option", "cpp_wrapper"], "--inductor-option expects KEY=VALUE"),
    ("generate", ["--tp", "3", "--model-path", "{tiny_llama}"],
     "error: --tp 3: num_attention_heads (4) must be divisible by the tensor-parallel size 3"),
    ("serve", ["--max-batch-size", "0"], "error: --max-batch-size must be an int >= 1, got 0"),
    ("serve", ["--dtype", "float8"], "argument --dtype: invalid choice"),
    ("serve", ["--quantize", "int3"], "argument --quantize: invalid choice"),
    ("generate", ["--quantize", "int8", "--quantize-group-size", "32"],
     "error: --quantize-group-size goes with int4 quantization, not quantize='int8'"),
    ("export", ["--out", "x", "--model-path", "/nonexistent/folder"], "no such folder"),
    ("pd", ["--role", "prompt", "--listen", "127.0.0.1:0", "--max-batch-size", "0"],
     "error: --max-batch-size must be an int >= 1, got 0"),
    ("pd", ["--role", "decoder", "--model-path", "meta-llama/Llama-3.2-1B"], "zoo never downloads"),
]


@pytest.mark.parametrize("entry, args, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_options_are_refused_before_torch_loads(tmp_path, entry, args, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    tiny_llama = os.path.join(ROOT, "zoo", "embedded", "tiny-llama")
    args = [a.replace("{file}", str(a_file)).replace("{tiny_llama}", tiny_llama) for a in args]
    rc, stderr, torch_imported = run_without_torch(entry, args)
    assert rc == 2, stderr
    assert message in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 25  # the usage lines, then one error
    assert not torch_imported


def test_a_mistyped_inductor_option_names_the_close_match():
    """Inductor's option names need torch to check: one line with the close matches, not a traceback."""
    rc, stderr, _ = run_without_torch("generate", ["--compiled", "--inductor-option", "cpp_wrappr=true",
                                                   "--max-new-tokens", "1"])
    assert rc == 2 and "Traceback" not in stderr
    assert "'cpp_wrappr'" in stderr and "did you mean cpp_wrapper" in stderr
