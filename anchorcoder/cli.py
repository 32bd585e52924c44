"""The entry points' one error path: a config or data error prints its message alone and exits 2; an
interrupt exits 130 after the run's own resume line; anything unexpected keeps its traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from anchorcoder.registry import ConfigError

EXIT_CONFIG_ERROR, EXIT_INTERRUPTED = 2, 130


@contextmanager
def reported_errors(config_error_exits: bool = True):
    try:
        yield
    except ConfigError as error:
        if not config_error_exits:  # a sweep job: Hydra records the failure and runs the next job
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
