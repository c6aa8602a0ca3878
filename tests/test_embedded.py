"""The tiny models shipped in the package continue the Zen of Python, through the API and the CLI."""
import codecs
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

import zoo
from zoo.models import embedded_model_path


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the poem
        import this
    return codecs.decode(this.s, "rot13")


ZEN = zen_of_python()
PROMPT = "Beautiful is"
GOLDEN = ZEN[ZEN.index(PROMPT) + len(PROMPT):]  # " better than ugly.\nExplicit is ..."


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_embedded_model_continues_the_zen(family):
    path = embedded_model_path(family)
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 8 * 2**20
    model = zoo.load(path)
    out = model.generate(PROMPT, max_new_tokens=60)
    assert len(out.text) > 100 and GOLDEN.startswith(out.text), out.text


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_embedded_model_recites_to_the_end_and_stops_at_eos(family):
    model = zoo.load(embedded_model_path(family))
    out = model.generate("Namespaces are", max_new_tokens=40)
    assert out.text == " one honking great idea -- let's do more of those!"
    assert out.finish_reason == "stop" and out.token_ids[-1] in model.engine.eos_token_ids


def test_stop_string_cuts_the_text_and_stream_holds_it_back():
    model = zoo.load(embedded_model_path("llama"))
    out = model.generate(PROMPT, max_new_tokens=60, stop=["Explicit"])
    assert out.text == " better than ugly.\n" and out.finish_reason == "stop"
    pieces = [ev.text for ev in model.stream(PROMPT, max_new_tokens=60, stop=["Explicit"])]
    assert "".join(pieces) == out.text and not any("Expl" in p for p in pieces)


def _cli(module, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.compiled
def test_cli_compiled_json(tmp_path):
    args = ["--compiled", "--prompt", PROMPT, "--prompt", "Simple is", "--json", "--max-new-tokens", "24",
            "--max-batch-size", "2", "--max-seq-len", "64", "--cache-dir", str(tmp_path / "cache")]
    run = _cli("zoo.llama.infer", *args)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "Simple is"]
    assert GOLDEN.startswith(rows[0]["text"]) and rows[0]["text"].startswith(" better than ugly.\nExplicit")
    assert set(rows[0]) == {"prompt", "text", "token_ids", "finish_reason", "prompt_tokens", "ttft_ms", "tpot_ms"}
    assert len(rows[0]["token_ids"]) == 24 and rows[0]["finish_reason"] == "length"
    assert "compiling decode graph" in run.stderr and "loading cached" not in run.stderr
    # the same command again: every graph comes from the graph cache, and the log says so
    again = _cli("zoo.llama.infer", *args)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["token_ids"] for line in again.stdout.splitlines()] == [r["token_ids"] for r in rows]
    assert "loading cached decode graph" in again.stderr and "compiling" not in again.stderr


def test_cli_streams_text_and_prints_a_summary():
    run = _cli("zoo.qwen.infer", "--prompt", PROMPT, "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(PROMPT + " better than ugly.")
    assert "time to first token" in run.stderr and "tok/s" in run.stderr


def test_cli_reports_a_missing_model_folder():
    run = _cli("zoo.llama.infer", "--model-path", "/nonexistent/model")
    assert run.returncode == 2 and "error: --model-path '/nonexistent/model': no such folder" in run.stderr
