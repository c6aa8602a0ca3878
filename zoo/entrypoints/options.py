"""What every command line shares: the model options (derived from zoo.settings.LoadSettings, so a
new load option appears in generate, serve, pd and export at once), the checks that need no model
(run before torch is even imported, so a typo costs a fraction of a second), and one mapping from
errors to messages and exit codes."""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

from zoo.config import read_config_json, tp_head_split_problem
from zoo.errors import TPWorkerError, ZooError
from zoo.settings import CLI_FIELDS, LoadSettings

# exit codes: 2 = the input is wrong (a path, a config, an option, a prompt); 1 = it broke while running
USAGE_ERROR, RUNTIME_ERROR = 2, 1
# Errors that name a problem with what the user gave: print "error: ..." and exit 2, no traceback.
USAGE_ERRORS = (ZooError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, plus "did you mean" for a mistyped option."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [flag for action in self._actions for flag in action.option_strings]
            hints = []
            for arg in unknown.group(1).split():
                flag = arg.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
                    if close:
                        hints.append(f"{flag}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                      defaults: dict | None = None, title: str = "model") -> argparse._ArgumentGroup:
    """Add LoadSettings' command-line options (all but `exclude`, field names) to `parser`.
    `defaults` overrides a field's default or help text: {"model_path": "(default: the tiny Qwen2)"}."""
    group = parser.add_argument_group(title)
    defaults = defaults or {}
    for f in CLI_FIELDS:
        if f.name in exclude:
            continue
        flags, kwargs = f.metadata["cli"]
        kwargs = dict(kwargs, dest=f.name)
        if f.name in defaults:
            kwargs["help"] = f"{kwargs.get('help', '')} {defaults[f.name]}".strip()
        if kwargs.get("action") == "append":
            kwargs["default"] = []
        elif "default" not in kwargs and kwargs.get("action") not in ("store_true", "store_false"):
            kwargs["default"] = f.default
        group.add_argument(*flags, **kwargs)
    return group


def settings_from_args(args: argparse.Namespace, **overrides) -> LoadSettings:
    """LoadSettings from parsed options (those add_model_options added), then `overrides`, checked as
    far as can be without loading anything (check_before_load)."""
    values = {f.name: getattr(args, f.name) for f in CLI_FIELDS if hasattr(args, f.name)}
    if "inductor_options" in values:
        values["inductor_options"] = dict(parse_key_value(o) for o in values["inductor_options"] or ()) or None
    values.update(overrides)
    return check_before_load(LoadSettings(**values))


# a Hugging Face Hub id: "org/name" that is not a folder here
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_before_load(settings: LoadSettings) -> LoadSettings:
    """What can be refused before torch loads: option values, a model folder that is not there (with
    a hint when it looks like a Hub id: zoo never downloads), a cache folder that cannot be written."""
    try:
        settings = settings.validated()
    except ValueError as e:  # LoadSettings names the field; a command line user typed its flag
        message = str(e)
        for f in CLI_FIELDS:
            if message.startswith(f"{f.name} "):
                message = f.metadata["cli"][0][0] + message[len(f.name):]
        raise ValueError(message) from None
    path = settings.model_path
    if path is not None and not os.path.isdir(path):
        hint = ""
        if _HUB_ID.match(str(path)) and not os.path.exists(path):
            hint = (f"; it looks like a Hugging Face Hub id, and zoo never downloads: fetch the folder first, e.g. "
                    f"`huggingface-cli download {path} --local-dir ./{os.path.basename(str(path))}`, then pass "
                    f"--model-path ./{os.path.basename(str(path))}")
        raise FileNotFoundError(f"--model-path {path!r}: no such folder{hint}")
    if path is not None and not settings.exported and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model-path {path!r}: no config.json in that folder (a Hugging Face checkpoint "
                                "folder has config.json, *.safetensors and tokenizer files)")
    if settings.cache_dir is not None:
        _check_writable_dir(settings.cache_dir, "--cache-dir")
    if path is not None and settings.tp_size > 1 and not settings.exported:
        raw, source = read_config_json(path)
        heads = raw.get("num_attention_heads")
        if isinstance(heads, int) and heads > 0:
            kv_heads = raw.get("num_key_value_heads") or heads
            problem = tp_head_split_problem(heads, kv_heads, settings.tp_size) if isinstance(kv_heads, int) else None
            if problem:
                raise ValueError(f"--tp {settings.tp_size}: {problem} ({source})")
    return settings


def _check_writable_dir(path: str, flag: str) -> None:
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{flag} {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: {existing!r} is not writable by this user")


def parse_key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, bool | int | float | str)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--inductor-option expects KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def positive_int_list(text: str) -> list[int]:
    """argparse type: "1,2,4" -> [1, 2, 4] (positive integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def report(error: BaseException) -> int:
    """Print one line naming the problem; the exit code for it."""
    print(f"error: {error}", file=sys.stderr)
    return RUNTIME_ERROR if isinstance(error, TPWorkerError) else USAGE_ERROR


def handled_errors() -> tuple[type[BaseException], ...]:
    """What an entry point catches and reports (anything else is a bug and keeps its traceback)."""
    return USAGE_ERRORS + (TPWorkerError,)
