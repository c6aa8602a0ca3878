"""Chat through the tokenizer's chat interface: the CLI's --chat (one-shot, piped stdin, the
interactive loop) and the server's chat requests, on the two embedded tiny models.

The CLI runs in-process (zoo.entrypoints.generate.main) with zoo.entrypoints.generate.load_from wrapped so each test can see the exact
prompt ids and sampling arguments the model was given; loaded models are cached per setting.
"""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import zoo
import zoo.entrypoints.generate
from zoo.models import embedded_model_path
from zoo.graphs import Buckets
from zoo.tokenizers import HFTokenizer as Tokenizer

FAMILIES = ["llama", "qwen2"]
NEW = 12  # max new tokens: enough to compare, short enough to stay fast
SYSTEM = "Answer in one line."

_real_load = zoo.load
_models: dict = {}


def cached_model(path: str, max_batch_size=2, max_seq_len=None):
    key = (path, max_batch_size, max_seq_len)
    if key not in _models:
        _models[key] = _real_load(path, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    return _models[key]


class Recorder:
    """A Model that notes what generate() / stream() were asked for, then runs them for real."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        return self.model.generate(prompts, **kwargs)

    def stream(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        return self.model.stream(prompts, **kwargs)


@pytest.fixture
def recorded(monkeypatch):
    """Patch the CLI's load(); returns the list of Recorders it handed out (one per main() call)."""
    made = []

    def load_from(settings):
        made.append(Recorder(cached_model(settings.model_path, settings.max_batch_size or 2, settings.max_seq_len)))
        return made[-1]

    monkeypatch.setattr(zoo.entrypoints.generate, "load_from", load_from)
    return made


class FakeTerminal:
    """stdin as a person at a terminal: isatty() is True and input() reads these lines in turn."""

    def __init__(self, lines):
        self.lines = list(lines)

    def isatty(self):
        return True

    def readline(self):
        return self.lines.pop(0) + "\n" if self.lines else ""  # "" = Ctrl-D

    def read(self):
        raise AssertionError("an interactive chat reads line by line")


def user(text):
    return {"role": "user", "content": text}


def chat_ids(family, messages):
    return cached_model(embedded_model_path(family)).tokenizer.apply_chat_template(messages)


def reference(family, messages, **kwargs):
    """What the model says to this conversation, called directly (greedy)."""
    model = cached_model(embedded_model_path(family))
    return model.generate(model.tokenizer.apply_chat_template(messages), max_new_tokens=NEW, **kwargs)


def json_lines(out: str):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def no_template_copy(tmp_path, family="llama"):
    folder = tmp_path / f"{family}-no-chat-template"
    shutil.copytree(embedded_model_path(family), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


# ---- one-shot --chat --prompt -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_gives_the_tokens_of_generate_on_the_templated_ids(family, capsys):
    """Real load (no recorder): the CLI's tokens are those of generate() on apply_chat_template ids."""
    rc = zoo.entrypoints.generate.main(family, ["--chat", "--prompt", "hi", "--max-new-tokens", str(NEW), "--max-batch-size", "2",
                               "--json"])
    assert rc == 0
    [out] = json_lines(capsys.readouterr().out)
    ref = reference(family, [user("hi")])
    assert out["token_ids"] == ref.token_ids and len(out["token_ids"]) > 0
    assert out["text"] == ref.text and out["prompt"] == "hi" and out["messages"] == [user("hi")]
    assert out["prompt_tokens"] == len(chat_ids(family, [user("hi")]))
    # the plain (non-chat) prompt "hi" is far shorter: the template really was applied
    assert out["prompt_tokens"] > len(cached_model(embedded_model_path(family)).tokenizer.encode("hi")) + 5


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_streams_only_the_reply(family, capsys, recorded):
    rc = zoo.entrypoints.generate.main(family, ["--chat", "--prompt", "Beautiful is", "--max-new-tokens", str(NEW)])
    assert rc == 0
    out = capsys.readouterr().out
    ref = reference(family, [user("Beautiful is")])
    assert out == ref.text + "\n"  # no template markup, no echoed prompt
    [(ids, kwargs)] = recorded[0].calls
    assert ids == [chat_ids(family, [user("Beautiful is")])]  # a batch of one


@pytest.mark.parametrize("family", FAMILIES)
def test_system_message_goes_first_in_the_prompt(family, capsys, recorded):
    rc = zoo.entrypoints.generate.main(family, ["--chat", "--system", SYSTEM, "--prompt", "hi", "--max-new-tokens", str(NEW),
                               "--json"])
    assert rc == 0
    [(ids, _)] = recorded[0].calls
    conversation = [{"role": "system", "content": SYSTEM}, user("hi")]
    assert ids == [chat_ids(family, conversation)] and ids != [chat_ids(family, [user("hi")])]
    [out] = json_lines(capsys.readouterr().out)
    assert out["messages"] == conversation and out["token_ids"] == reference(family, conversation).token_ids


def test_several_chat_prompts_are_one_batch_each_under_its_message(capsys, recorded):
    rc = zoo.entrypoints.generate.main("qwen2", ["--chat", "--prompt", "hi", "--prompt", "Flat is", "--max-new-tokens", str(NEW)])
    assert rc == 0
    [(ids, _)] = recorded[0].calls
    assert ids == [chat_ids("qwen2", [user("hi")]), chat_ids("qwen2", [user("Flat is")])]
    out = capsys.readouterr().out
    first, second = (reference("qwen2", [user(p)]).text for p in ("hi", "Flat is"))
    assert out == f"\n--- [0] hi\n{first}\n--- [1] Flat is\n{second}\n"


# ---- end of turn -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_end_of_turn_tokens_are_stop_tokens(family, capsys, recorded):
    rc = zoo.entrypoints.generate.main(family, ["--chat", "--prompt", "hi", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    [(_, kwargs)] = recorded[0].calls
    tokenizer = cached_model(embedded_model_path(family)).tokenizer
    end_of_turn = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>"}[family]
    assert tokenizer.chat_stop_token_ids == (tokenizer.hf.get_vocab()[end_of_turn],)
    assert list(kwargs["stop_token_ids"]) == list(tokenizer.chat_stop_token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reply_stops_at_an_end_of_turn_token(family, capsys, monkeypatch):
    """The tiny models never say <|eot_id|>, so a token the greedy reply does produce plays its part."""
    ref = reference(family, [user("hi")])
    k = 3
    stop = ref.token_ids[k]
    k = ref.token_ids.index(stop)  # its first appearance
    monkeypatch.setattr(Tokenizer, "chat_stop_token_ids", property(lambda self: (stop,)))
    rc = zoo.entrypoints.generate.main(family, ["--chat", "--prompt", "hi", "--max-new-tokens", str(NEW), "--max-batch-size", "2",
                               "--json"])
    assert rc == 0
    [out] = json_lines(capsys.readouterr().out)
    assert out["token_ids"] == ref.token_ids[:k + 1] and out["finish_reason"] == "stop"


# ---- errors ------------------------------------------------------------------------------------
def test_system_without_chat_is_a_usage_error(capsys, recorded):
    with pytest.raises(SystemExit) as exit_:
        zoo.entrypoints.generate.main("llama", ["--system", SYSTEM, "--prompt", "hi"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --system" in err and "needs --chat" in err
    assert recorded == []  # refused before loading anything


@pytest.mark.parametrize("stdin", ["terminal", "prompt"])
def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tmp_path, capsys, monkeypatch, stdin):
    folder = no_template_copy(tmp_path)
    argv = ["--model-path", str(folder), "--chat", "--max-batch-size", "1", "--max-new-tokens", "4"]
    if stdin == "prompt":
        argv += ["--prompt", "hi"]
    else:
        monkeypatch.setattr(sys, "stdin", FakeTerminal(["hi"]))
    assert zoo.entrypoints.generate.main("llama", argv) == 2
    captured = capsys.readouterr()
    assert "error: --chat needs a chat template" in captured.err and str(folder) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_the_no_template_folder_still_works_without_chat(tmp_path, capsys):
    folder = no_template_copy(tmp_path)
    rc = zoo.entrypoints.generate.main("llama", ["--model-path", str(folder), "--prompt", "Beautiful is", "--max-new-tokens", "4",
                                "--max-batch-size", "1"])
    assert rc == 0 and capsys.readouterr().out.startswith("Beautiful is better than")


def test_a_model_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(embedded_model_path("qwen2"), name), folder / name)
    assert zoo.entrypoints.generate.main("qwen2", ["--model-path", str(folder), "--chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "error: --chat needs a tokenizer" in err and "no tokenizer files" in err and "Traceback" not in err


# ---- piped stdin -------------------------------------------------------------------------------
def test_piped_stdin_is_one_user_message(capsys, monkeypatch, recorded):
    message = "Beautiful is\nExplicit is"
    monkeypatch.setattr(sys, "stdin", io.StringIO(message + "\n"))
    assert zoo.entrypoints.generate.main("qwen2", ["--chat", "--max-new-tokens", str(NEW), "--json"]) == 0
    [(ids, _)] = recorded[0].calls
    assert ids == [chat_ids("qwen2", [user(message)])]
    [out] = json_lines(capsys.readouterr().out)
    assert out["prompt"] == message and out["token_ids"] == reference("qwen2", [user(message)]).token_ids


def test_empty_piped_stdin_is_an_error(capsys, monkeypatch, recorded):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert zoo.entrypoints.generate.main("qwen2", ["--chat"]) == 2
    assert "empty message from stdin" in capsys.readouterr().err and recorded == []


def test_piped_stdin_from_the_shell():
    """The documented `echo ... | python -m zoo.qwen.infer --chat`, as a real process with a real pipe."""
    run = subprocess.run([sys.executable, "-m", "zoo.qwen.infer", "--chat", "--max-new-tokens", str(NEW),
                          "--max-batch-size", "1"], input="hi\n", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference("qwen2", [user("hi")]).text + "\n"


# ---- the interactive loop ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_interactive_chat_keeps_the_conversation(family, capsys, monkeypatch, recorded):
    terminal = FakeTerminal(["Beautiful is", "", "Explicit is", "/exit", "never read"])
    monkeypatch.setattr(sys, "stdin", terminal)
    assert zoo.entrypoints.generate.main(family, ["--chat", "--system", SYSTEM, "--max-new-tokens", str(NEW)]) == 0
    assert terminal.lines == ["never read"]  # /exit ended it; the empty line was skipped
    calls = recorded[0].calls
    assert len(calls) == 2
    system = {"role": "system", "content": SYSTEM}
    first = reference(family, [system, user("Beautiful is")]).text
    assert first and calls[0][0] == chat_ids(family, [system, user("Beautiful is")])
    # the second turn's prompt holds the first turn and its reply
    history = [system, user("Beautiful is"), {"role": "assistant", "content": first}, user("Explicit is")]
    assert calls[1][0] == chat_ids(family, history)
    second = reference(family, history).text
    # (a fake terminal does not echo what the user types)
    assert capsys.readouterr().out == f"you> assistant> {first}\nyou> you> assistant> {second}\nyou> "
    assert set(calls[0][1]["stop_token_ids"]) == set(recorded[0].tokenizer.chat_stop_token_ids)


def test_reset_clears_the_history_but_keeps_the_system_message(capsys, monkeypatch, recorded):
    monkeypatch.setattr(sys, "stdin", FakeTerminal(["Beautiful is", "/reset", "Explicit is"]))  # then Ctrl-D
    assert zoo.entrypoints.generate.main("llama", ["--chat", "--system", SYSTEM, "--max-new-tokens", "4"]) == 0
    system = {"role": "system", "content": SYSTEM}
    assert [ids for ids, _ in recorded[0].calls] == [chat_ids("llama", [system, user("Beautiful is")]),
                                                     chat_ids("llama", [system, user("Explicit is")])]
    assert "starts over" in capsys.readouterr().err


def test_quit_ends_at_once(capsys, monkeypatch, recorded):
    monkeypatch.setattr(sys, "stdin", FakeTerminal(["/quit", "hi"]))
    assert zoo.entrypoints.generate.main("llama", ["--chat"]) == 0 and recorded[0].calls == []


def test_a_conversation_that_no_longer_fits_drops_its_oldest_turns(capsys, monkeypatch, recorded):
    system = {"role": "system", "content": SYSTEM}
    u1, u2, u3 = user("Beautiful is"), user("Explicit is"), user("Simple is")
    a1 = {"role": "assistant", "content": reference("llama", [system, u1]).text}
    a2 = {"role": "assistant", "content": reference("llama", [system, u1, a1, u2]).text}
    # room for the second turn with its history, not for the third with both earlier turns
    limit = len(chat_ids("llama", [system, u1, a1, u2, a2, u3])) + NEW - 1
    assert len(chat_ids("llama", [system, u1, a1, u2])) + NEW <= limit
    assert len(chat_ids("llama", [system, u2, a2, u3])) + NEW <= limit
    monkeypatch.setattr(sys, "stdin", FakeTerminal(["Beautiful is", "Explicit is", "Simple is", "/exit"]))
    rc = zoo.entrypoints.generate.main("llama", ["--chat", "--system", SYSTEM, "--max-new-tokens", str(NEW), "--max-seq-len",
                                str(limit)])
    assert rc == 0
    calls = [ids for ids, _ in recorded[0].calls]
    assert calls[1] == chat_ids("llama", [system, u1, a1, u2])
    assert calls[2] == chat_ids("llama", [system, u2, a2, u3])  # the oldest turn went, the system message stayed
    assert f"no longer fits in max_seq_len={limit}: dropped the oldest 1 turn(s)" in capsys.readouterr().err


def test_a_message_too_long_on_its_own_is_reported_and_the_chat_goes_on(capsys, monkeypatch, recorded):
    monkeypatch.setattr(sys, "stdin", FakeTerminal(["Beautiful is " * 40, "hi", "/exit"]))
    assert zoo.entrypoints.generate.main("llama", ["--chat", "--max-new-tokens", "4", "--max-seq-len", "64"]) == 0
    err = capsys.readouterr().err
    assert "error: this message makes a prompt of" in err and "max_seq_len is 64" in err and "Traceback" not in err
    assert [ids for ids, _ in recorded[0].calls] == [chat_ids("llama", [user("hi")])]


# ---- compiled mode's warm-up -------------------------------------------------------------------
class _WarmUpProbe:
    def __init__(self):
        self.buckets = Buckets((1, 2, 4), (32, 64), context_lens=(16, 32, 64))
        self.max_seq_len = 64
        self.tokenizer = cached_model(embedded_model_path("llama")).tokenizer
        self.warmed = []

    def warmup(self, batch_sizes, prompt_lens, context_lens):
        self.warmed.append((batch_sizes, prompt_lens, context_lens))


def test_warm_up_measures_chat_token_ids_and_text_prompts():
    probe = _WarmUpProbe()
    zoo.entrypoints.generate._warm_up_for(probe, [list(range(10)), list(range(21)), list(range(3))], 8)
    zoo.entrypoints.generate._warm_up_for(probe, ["Beautiful is"], 8)
    # the decode contexts a generation of 8 more tokens can reach: 21 + 8 -> up to 32; 3 + 8 -> 16
    assert probe.warmed == [([4], [21], [16, 32]), ([1], [len(probe.tokenizer.encode("Beautiful is"))], [16])]


@pytest.mark.compiled
def test_compiled_chat_gives_the_eager_tokens(capsys):
    """--compiled warms up for the chat prompt's length (its ids, not the raw message) before timing."""
    rc = zoo.entrypoints.generate.main("llama", ["--compiled", "--chat", "--prompt", "hi", "--max-new-tokens", "8",
                                "--max-batch-size", "1", "--max-seq-len", "64", "--json"])
    assert rc == 0
    [out] = json_lines(capsys.readouterr().out)
    assert out["token_ids"] == reference("llama", [user("hi")]).token_ids[:8]


# ---- the server formats chats the same way -----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_server_chat_requests_use_the_chat_interface(family):
    from zoo.serve import create_app
    from zoo.serve.app import ServerSettings
    from zoo.serve.protocol import ChatCompletionBody, parse_body

    model = cached_model(embedded_model_path(family))
    server = create_app(model).state.server  # not started: chat_requests only builds requests
    messages = [{"role": "system", "content": SYSTEM}, user("hi")]
    body = parse_body(json.dumps({"messages": messages, "max_tokens": 4}).encode(), ChatCompletionBody)
    [req] = server.chat_requests(body)
    assert req.prompt_ids == model.tokenizer.apply_chat_template(messages)
    assert req.params.stop_token_ids == model.tokenizer.chat_stop_token_ids != ()
    # ignore_eos (fixed-length benchmarks) ignores the end-of-turn token as well
    body = parse_body(json.dumps({"messages": messages, "max_tokens": 4, "ignore_eos": True}).encode(),
                      ChatCompletionBody)
    assert server.chat_requests(body)[0].params.stop_token_ids == ()
    # --chat-template overrides the tokenizer's
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    server = create_app(model, ServerSettings("tiny", chat_template=template)).state.server
    [req] = server.chat_requests(parse_body(json.dumps({"messages": messages}).encode(), ChatCompletionBody))
    assert req.prompt_ids == model.tokenizer.apply_chat_template(messages, template=template)
    assert req.prompt_ids != model.tokenizer.apply_chat_template(messages)
