"""User-facing errors. The CLI prints these as one line (no traceback unless --debug)."""


class InterpHealError(Exception):
    """Base for errors caused by the user's input or environment, not by a bug."""


class ConfigError(InterpHealError):
    """Invalid config file, key or value; the message names the key path."""


class ModelSpecError(InterpHealError):
    """A model spec that is neither embedded, a local folder, nor loadable from the hub."""


class PersonaError(InterpHealError):
    """An empty, identical or unknown persona pair."""


class DataError(InterpHealError):
    """Missing or malformed data files."""


class RunLockedError(InterpHealError):
    """Another process holds the run folder."""


class AxisNotExpressibleError(InterpHealError):
    """check-axis found that the trait readout cannot see the persona axis on this model."""
