class ConfigError(ValueError):
    """Bad user input (config, paths, files): the entry points print it as one line and exit 2."""
