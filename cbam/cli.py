"""What the entry points share: bad input is one line on stderr and a documented exit status."""

import functools
import logging
import sys

from cbam.engine.loop import NonFiniteLoss
from cbam.engine.run import PREEMPTED_EXIT_CODE, Preempted
from cbam.errors import ConfigError

log = logging.getLogger("cbam")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def entry_point(fn):
    """Turn the errors a user can act on into one line and an exit status instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            log.error("error: %s", e)
            sys.exit(EXIT_BAD_INPUT)
        except NonFiniteLoss as e:
            log.error("error: %s", e)
            sys.exit(EXIT_NONFINITE)
        except Preempted as e:
            log.warning("%s", e)
            sys.exit(PREEMPTED_EXIT_CODE)

    return wrapper
