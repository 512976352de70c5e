"""User-facing errors: what the command-line tools turn into one line and exit status 2.

A `UserError` is a problem with what the user gave us (a file, a folder, a config key),
never a bug. The command-line tools print it as one line on stderr and exit with status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2."""


class WriteError(UserError):
  """The file system refused a write (full, over quota, read-only, not permitted).

  Never a property of the input being processed: code that skips bad inputs lets it
  through, so a full disk is not mistaken for a bad case.
  """
