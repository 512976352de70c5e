"""User-facing errors and the command-line wrapper that turns them into exit status 2.

A `UserError` is a problem with what the user gave us (a file, a folder, a config key),
never a bug. The command-line tools print it as one line on stderr and exit with status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2."""


class WriteError(UserError):
  """The file system refused a write (full, over quota, read-only, not permitted).

  Never a property of the input being processed: code that skips bad inputs lets it
  through, so a full disk is not mistaken for a bad case.
  """


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """Runs `main(argv)`; a `UserError` becomes one stderr line and exit status 2.

  With `--debug` in argv the error is re-raised so the full traceback shows.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  if debug:
    argv.remove("--debug")
  try:
    return int(main(argv) or 0)
  except UserError as e:
    if debug:
      raise
    message = " ".join(str(e).split())  # always one line
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR
