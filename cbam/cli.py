"""What the entry points share: bad input is one line on stderr and a documented exit status."""

import atexit
import functools
import logging
import shutil
import sys
import tempfile

from cbam.engine.distributed import launched_rank
from cbam.engine.run import PREEMPTED_EXIT_CODE, Preempted
from cbam.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, Diverged

log = logging.getLogger("cbam")


def entry_point(fn):
    """Turn the errors a user can act on into one line and an exit status instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            log.error("error: %s", e)
            sys.exit(EXIT_BAD_INPUT)
        except Diverged as e:
            log.error("error: %s", e)
            sys.exit(EXIT_DIVERGED)
        except Preempted as e:
            log.warning("%s", e)
            sys.exit(PREEMPTED_EXIT_CODE)

    return wrapper


# Hydra keys that would give a rank its own run dir or train.log.
_OWN_OUTPUT = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra/job_logging=", "hydra.job_logging.")


def torchrun_argv(argv: list[str]) -> list[str]:
    """The command line Hydra should see in this process: as given, except under torchrun on ranks > 0.

    Each rank runs Hydra itself, and a `${now:}` in the run dir resolves to another second on each; rank 0's
    dir is the run's (train() broadcasts it to the others). So a rank > 0 gets a throwaway Hydra dir,
    removed at exit, and logs warnings to stderr only: no dir and no train.log of its own anywhere.
    """
    rank = launched_rank()
    if rank == 0:
        return argv
    tmp = tempfile.mkdtemp(prefix=f"cbam-rank{rank}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ours = [
        f"hydra.run.dir={tmp}",
        f"hydra.sweep.dir={tmp}",
        "hydra/job_logging=stderr",
        "hydra/hydra_logging=disabled",  # rank 0 prints Hydra's own lines (a multirun's job list)
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.plain.format='[rank {rank}] %(levelname)s: %(message)s'",
    ]
    args = [a for a in argv[1:] if not a.lstrip("+").startswith(_OWN_OUTPUT)]
    # Hydra's overrides must stay one block (argparse takes one run of positionals): ours go before the first.
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [argv[0], *args[:at], *ours, *args[at:]]
