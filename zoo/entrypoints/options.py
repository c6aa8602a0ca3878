"""What every command line shares: the model options (derived from zoo.settings.LoadSettings, so a
new load option appears in generate, serve, pd and export at once) and one mapping from errors to
messages and exit codes."""
from __future__ import annotations

import argparse
import sys

from zoo.errors import TPWorkerError, ZooError
from zoo.settings import CLI_FIELDS, LoadSettings

# exit codes: 2 = the input is wrong (a path, a config, an option, a prompt); 1 = it broke while running
USAGE_ERROR, RUNTIME_ERROR = 2, 1
# Errors that name a problem with what the user gave: print "error: ..." and exit 2, no traceback.
USAGE_ERRORS = (ZooError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


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
    """LoadSettings from parsed options (those add_model_options added), then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in CLI_FIELDS if hasattr(args, f.name)}
    if "inductor_options" in values:
        values["inductor_options"] = dict(parse_key_value(o) for o in values["inductor_options"] or ()) or None
    values.update(overrides)
    return LoadSettings(**values)


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
