"""Exceptions shared across poa_hpc (kept import-free so every module can raise them)."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""
