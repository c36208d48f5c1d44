"""The errors a user can act on, each with its exit status, and the one place configs become objects."""

import functools
import logging
from collections.abc import Callable

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# EX_TEMPFAIL, "try again": what a requeue script should do with a preempted run (`resume=auto` continues),
# or with one that another process is still training.
EXIT_TRY_AGAIN = 75


class CbamError(Exception):
    """An outcome the entry points print as one line (no traceback) and exit with `exit_code`."""

    exit_code = 1
    level = logging.ERROR
    prefix = "error: "

    def report(self, log: logging.Logger) -> None:
        """Log the line once: a run logs it into its train.log, the entry point then only exits."""
        if not getattr(self, "reported", False):
            log.log(self.level, "%s%s", self.prefix, self)
            self.reported = True


class ConfigError(CbamError, ValueError):
    """Bad user input (config, paths, files): exit 2."""

    exit_code = EXIT_BAD_INPUT


class Diverged(CbamError, RuntimeError):
    """A non-finite loss (past trainer.max_nonfinite_steps) or non-finite weights: exit 3."""

    exit_code = EXIT_DIVERGED


class Preempted(CbamError):
    """SIGTERM or SIGINT arrived; last.pt holds the state at the end of the current step: exit 75.
    `run_finished`: it arrived after the last step, each rank seeing its own signal (no step agreed on it)."""

    exit_code = EXIT_TRY_AGAIN  # also the W&B run's exit code
    level = logging.WARNING
    prefix = ""

    def __init__(self, message: str, *, run_finished: bool = False):
        super().__init__(message)
        self.run_finished = run_finished


class RunInProgress(CbamError):
    """Another process holds the run dir (train.lock): this one leaves the run to it and writes nothing: exit 75."""

    exit_code = EXIT_TRY_AGAIN


# What constructors raise for arguments they cannot take.
CONSTRUCTOR_ERRORS = (ValueError, TypeError, RuntimeError)


def construct(key: str, factory: Callable, *args, **kwargs):
    """`factory(*args, **kwargs)`, where an error of the constructor (torch's ValueError "Invalid learning
    rate: -1", a TypeError for an unexpected keyword, its RuntimeError for a negative size) is a bad value
    under config `key`: a ConfigError naming it. Our own errors pass through: they already name the fix."""
    try:
        return factory(*args, **kwargs)
    except CbamError:
        raise
    except CONSTRUCTOR_ERRORS as e:
        name = getattr(factory, "__qualname__", None) or getattr(getattr(factory, "func", None), "__qualname__", "")
        raise ConfigError(f"{key}: {name} rejected the config ({e}): fix the value under {key}") from None


def instantiate_config(node: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate of the config at `key` (e.g. "optim.optimizer"), with constructor errors as
    ConfigErrors naming `key`. A `_partial_` node comes back as a callable that maps them the same way
    when it is called (an optimizer gets its parameters only then)."""
    target = OmegaConf.select(node, "_target_", default="?") if isinstance(node, DictConfig) else "?"
    try:
        obj = instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, CbamError):
            raise cause from None
        if isinstance(cause, CONSTRUCTOR_ERRORS):
            raise ConfigError(f"{key}: {target} rejected the config ({cause}): fix the value under {key}") from None
        raise
    if isinstance(obj, functools.partial):
        return functools.partial(construct, key, obj)
    return obj
