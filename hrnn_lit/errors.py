"""User-facing errors: each carries a one-line message naming the key or file at fault."""


class HrnnError(Exception):
    """Base class; the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(HrnnError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(HrnnError):
    """An input file or the data derived from it cannot be used."""


class NumericalError(HrnnError, FloatingPointError):
    """Training diverged (a NaN or infinite loss, or the divergence guard's band left), or
    evaluation met a non-finite score."""
