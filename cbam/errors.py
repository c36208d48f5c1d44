from hydra.errors import InstantiationException
from hydra.utils import instantiate

# Exit statuses shared by the entry points (train.py, eval.py, scripts/).
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class ConfigError(ValueError):
    """Bad user input (config, paths, files): the entry points print it as one line and exit 2."""


def instantiate_config(node, **kwargs):
    """hydra.utils.instantiate, but our own errors come out as themselves: they already name the
    option and the fix, and Hydra's InstantiationException wrapper only buries them."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


class Diverged(RuntimeError):
    """A non-finite loss (past trainer.max_nonfinite_steps) or non-finite weights: the entry points
    print it as one line and exit 3."""
