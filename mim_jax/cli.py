"""What every command-line entry point shares: logging set-up and one-line user errors."""

import sys
from typing import Callable

from absl import logging

from mim_jax.data.sources import DataError
from mim_jax.errors import UserError

USER_ERRORS = (UserError, DataError)


def run_reporting_user_errors(main: Callable[[], object]) -> None:
  """Runs `main`; a user mistake exits with status 2 and one line on stderr, no trace."""
  try:
    main()
  except USER_ERRORS as error:
    logging.flush()
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
