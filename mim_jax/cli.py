"""What every command-line entry point shares: logging set-up and one-line user errors."""

import sys
from typing import Callable

from absl import flags, logging

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
  """Runs `main`; a user mistake exits with status 2 and one line on stderr, no trace.

  Ctrl-C exits with status 130 and one line (the trainer's says what it saved).
  """
  quiet_library_logs()
  try:
    main()
  except USER_ERRORS as error:
    logging.flush()
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as interrupt:
    logging.flush()
    print(str(interrupt) or "interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(flags_parser=...)`: a bad --config.key is one line.

  ml_collections reports an unknown or mistyped `--config.key=value` with a raw
  exception; this turns it into `error: ...` and exit status 2.
  """
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
      flags.FLAGS["config"].value.keys()  # a config file that failed to load raises here
    return remaining
  except flags.Error as error:
    lines = [line for line in str(error).splitlines() if line.strip()]
    # A config file whose get_config() raised: its own last line says what was wrong.
    message = lines[0] if "Traceback" not in str(error) else f"{lines[0]} {lines[-1]}"
  except (KeyError, AttributeError) as error:  # ml_collections: a key the locked config lacks
    key = str(error).strip("\"'")
    message = (f"unknown config key {key!r} in a --config.key=value override (the config is "
               f"locked: check the spelling)")
  except (TypeError, ValueError) as error:
    message = f"bad config override: {error}"
  except OSError as error:
    message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
