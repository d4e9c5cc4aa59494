"""User-facing errors.

Every error a user can cause by what they pass in (a path, a preset, a spec) is a
`JaxInductError`: the CLI prints its message and exits non-zero without a
traceback. Messages name what is wrong and how to fix it.
"""


class JaxInductError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class SpecError(JaxInductError, ValueError):
    """A model spec or a set of weights is inconsistent."""


class CorpusError(JaxInductError):
    """A training corpus is missing, empty or unreadable."""


class RunDirError(JaxInductError):
    """An output directory cannot hold the requested run."""


class ConfigError(JaxInductError, ValueError):
    """An unknown preset or an invalid training option."""
