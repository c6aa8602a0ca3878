"""Every error zoo raises on purpose, in one leaf module every layer may import.

Each names what is wrong (the file, the field, the parameter) so a user can fix it. Entry points
map them to exit codes (zoo.entrypoints.options.report); the server maps RequestError to 400.
"""


class ZooError(Exception):
    """Base of the errors below (catch this to handle any of them)."""


class ConfigError(ZooError, ValueError):
    """config.json describes something zoo cannot run."""


class CheckpointError(ZooError, ValueError):
    """A checkpoint folder's weights are missing, malformed or do not match the config."""


class CompileConfigError(ZooError, ValueError):
    """A compile-config TOML file has an unknown key or a wrong value."""


class DeviceError(ZooError, RuntimeError):
    """The device asked for is unknown or its software stack is not usable here."""


class RequestError(ZooError, ValueError):
    """A request that cannot be run (empty, too long, bad parameters); nothing was queued."""


class ChatTemplateError(ZooError, ValueError):
    """The model's tokenizer has no chat template, so messages cannot be turned into a prompt."""


class TPWorkerError(ZooError, RuntimeError):
    """A tensor-parallel rank died, hung past the timeout, or failed to start."""
