"""What every command-line entry point shares: logging set-up and one-line user errors."""

import sys
from typing import Callable

from absl import logging

from mim_jax.data.sources import DataError
from mim_jax.errors import UserError

USER_ERRORS = (UserError, DataError)


class _HideLibraryChatter(logging.logging.Filter):
  """Drops orbax's and TFDS's INFO records (dozens per checkpoint); warnings stay."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
    return record.levelno >= logging.logging.WARNING or not noisy


def quiet_library_logs() -> None:
  logging.get_absl_logger().addFilter(_HideLibraryChatter())


def run_reporting_user_errors(main: Callable[[], object]) -> None:
  """Runs `main`; a user mistake exits with status 2 and one line on stderr, no trace."""
  quiet_library_logs()
  try:
    main()
  except USER_ERRORS as error:
    logging.flush()
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
