"""Errors a user can cause. The CLI prints them as one line and exits 2, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data file, model path, ...), not a bug."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


class DataError(UserError):
    """A malformed, missing or empty data file."""


class ModelError(UserError):
    """A model path that does not exist or is not a causal LM, or incompatible tokenizers."""


class TrainingDiverged(UserError):
    """A NaN or infinite loss: training stopped, the last good checkpoint is kept."""


class OutputError(Exception):
    """An output could not be written (e.g. a full disk): nothing half-written is left; the CLI exits 1."""
