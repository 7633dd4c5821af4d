"""What every command-line entry point shares: logging set-up and one-line user errors.

A user mistake, wherever it is found (flag parsing, the config file, a config
value, a path, a checkpoint), ends the command with exit status 2 and exactly one
line `error: ...` on stderr: no usage text, no stack trace. Anything else is a
bug and keeps its trace.
"""

import re
import sys
import traceback
from collections.abc import Sequence
from typing import Callable, NoReturn

from absl import app, flags, logging

from mim_jax.data.sources import DataError
from mim_jax.errors import UserError

# app.UsageError: absl's own "wrong command line"; printed alone, without the usage text.
USER_ERRORS = (UserError, DataError, app.UsageError)


class _HideLibraryChatter(logging.logging.Filter):
  """Drops orbax's and TFDS's INFO records (dozens per checkpoint); warnings stay."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
    return record.levelno >= logging.logging.WARNING or not noisy


def quiet_library_logs() -> None:
  logging.get_absl_logger().addFilter(_HideLibraryChatter())


def one_line(text: str) -> str:
  """`text` with its line breaks and runs of spaces folded into single spaces."""
  return " ".join(str(text).split())


def exit_with_error(message: str) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  logging.flush()
  sys.stdout.flush()
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_reporting_user_errors(main: Callable[[], object]) -> None:
  """Runs `main`; a user mistake exits with status 2 and one line on stderr, no trace.

  Ctrl-C exits with status 130 and one line (the trainer's says what it saved).
  """
  quiet_library_logs()
  try:
    main()
  except USER_ERRORS as error:
    exit_with_error(str(error))
  except KeyboardInterrupt as interrupt:
    logging.flush()
    print(str(interrupt) or "interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)


def check_no_arguments(argv: Sequence[str]) -> None:
  """Raises UserError if a command that takes only --flags got positional arguments."""
  if len(argv) > 1:
    extra = " ".join(argv[1:])
    raise UserError(f"unexpected argument {extra!r}: this command takes only --flags "
                    f"(--name=value; config keys as --config.key=value)")


# ----------------------------------------------------------------------------
# Flag parsing
# ----------------------------------------------------------------------------
def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(flags_parser=...)`: every mistake is one line, status 2.

  Covers unknown or malformed flags, a config file that is missing, does not parse,
  has no `get_config` or whose `get_config` raises, and a `--config.key=value`
  override of a key the locked config lacks (ml_collections reports these with raw
  exceptions or a stack trace).
  """
  try:
    remaining = flags.FLAGS(argv)
    _check_config_loaded()
    return remaining
  except Exception as error:  # pylint: disable=broad-exception-caught
    message = _flag_error_message(error, argv)
    if message is None:
      raise
  exit_with_error(message)


def _check_config_loaded() -> None:
  """A config file that failed to load raises only when its value is first read: read it."""
  if "config" not in flags.FLAGS:
    return
  config = flags.FLAGS["config"]
  if config.value is None:
    if config.present:
      raise UserError("its get_config() returned None instead of a ConfigDict")
    return
  config.value.keys()  # an unreadable file raises here (ml_collections defers the error)


def _flag_error_message(error: Exception, argv: Sequence[str]) -> str | None:
  """The one-line message for an error of flag parsing; None for what is not the user's."""
  if _raised_loading_config_file(error):
    return f"cannot load {_config_argument(argv)}: {_describe_config_failure(error)}"
  text = str(error)
  if isinstance(error, flags.Error) and "Error whilst parsing config file" in text:
    # get_config() raised a TypeError/ValueError; ml_collections put its trace in the
    # message: the last line says what was wrong.
    lines = [line for line in text.splitlines() if line.strip()]
    return f"cannot load {_config_argument(argv)}: {lines[-1].strip()}"
  if isinstance(error, flags.Error):
    return text
  misspelt = _unknown_key(error)
  if misspelt is not None:
    key, suggestion = misspelt
    override = next((arg for arg in argv
                     if arg.startswith("--config.") and key in arg.split("=", 1)[0].split(".")),
                    "a --config.key=value override")
    hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
    return (f"unknown config key {key!r} in {override}{hint}; the config is locked: check "
            f"the spelling")
  if isinstance(error, OSError) and "failure to load" in text:
    # ml_collections' deferred report: the cause is on its last line.
    cause = text.strip().splitlines()[-1].split("failure to load:")[-1].strip()
    return f"cannot load {_config_argument(argv)}: {cause}"
  if isinstance(error, UserError):
    return f"cannot load {_config_argument(argv)}: {error}"
  if isinstance(error, (TypeError, ValueError)):
    return f"bad config override: {text}"
  return None


def _raised_loading_config_file(error: Exception) -> bool:
  """Whether `error` escaped from running a config file (its code or its get_config):
  then ml_collections' config-file parser is on the stack (matched by name: the class
  is not public)."""
  return any(type(frame.f_locals.get("self")).__name__ == "ConfigFileFlagParser"
             for frame, _ in traceback.walk_tb(error.__traceback__))


def _describe_config_failure(error: Exception) -> str:
  if isinstance(error, SyntaxError):
    return f"SyntaxError: {error.msg} (line {error.lineno})"
  if isinstance(error, AttributeError) and getattr(error, "name", None) == "get_config":
    return "it defines no get_config() function"
  where = [f"{frame.f_code.co_filename.rsplit('/', 1)[-1]} line {frame.f_lineno}"
           for frame, _ in traceback.walk_tb(error.__traceback__)
           if not frame.f_code.co_filename.startswith(("<", sys.prefix, sys.base_prefix))
           and "ml_collections" not in frame.f_code.co_filename]
  location = f" ({where[-1]})" if where else ""
  return f"{type(error).__name__}: {one_line(str(error))}{location}"


def _config_argument(argv: Sequence[str]) -> str:
  """The --config=... argument as given (for messages)."""
  return next((arg for arg in argv if arg.startswith("--config=")), "--config")


def _unknown_key(error: Exception) -> tuple[str, str | None] | None:
  """(key, suggested key) when `error` is ml_collections' report of an unknown key."""
  inner = error.args[0] if isinstance(error, AttributeError) and error.args else error
  if not isinstance(inner, KeyError) or not inner.args:
    return None
  lines = str(inner.args[0]).splitlines()
  key = lines[0].strip().strip("'\"")
  match = re.search(r'Did you mean "([^"]+)"', str(inner.args[0]))
  return key, match.group(1) if match else None
