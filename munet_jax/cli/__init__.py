"""The command-line tools: flags in, one library call, a table or a line out.

Every tool is a module here with `main(argv) -> int` and `entry()` (its console script,
declared in pyproject.toml). `train.py`, `eval.py` and `predict.py` at the repository root
and `python -m munet_jax.data.check` (and the other data tools) call the same `main`.

One convention for all of them: a `UserError` (a bad file, folder, flag or config key) is
one line on stderr and exit status 2, bad flags included (`Parser`); `--debug` shows the
traceback instead. This package and the data tools' modules import no JAX until a tool
needs it, so `munet-check` and `munet-prepare` start fast on a login node.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from munet_jax.errors import UserError

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one-line `UserError`s named after the tool."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}")


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
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


def entry_point(main: Callable[[Sequence[str]], int | None]) -> Callable[[], None]:
  """A console script's function: `main` on sys.argv, exiting with its status."""
  def entry():
    sys.exit(run(main))
  return entry
