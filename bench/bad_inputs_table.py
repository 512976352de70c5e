#!/usr/bin/env python
"""The bad-input table of bench/RESULTS.md, from what the reliability suite observed.

  pytest tests/reliability/test_bad_inputs.py
  python bench/bad_inputs_table.py /tmp/pytest-of-$USER/pytest-N/reliability-bad-inputs

The suite writes each case's exit status and stderr to `outcomes.json` in that folder
(see `outcomes` in tests/reliability/test_bad_inputs.py); this prints one markdown row a
case, in the order of `CASES`, paths shortened to T/ (the folder of bad files), RUN/,
DATA/ and CONFIG.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reliability"))

from test_bad_inputs import CASES  # noqa: E402


def main(folder):
  with open(os.path.join(folder, "outcomes.json")) as f:
    outcomes = json.load(f)
  base = os.path.dirname(os.path.abspath(folder))
  short = [(os.path.abspath(folder), "T"),
           (os.path.join(base, "reliability-reference", "run"), "RUN"),
           (os.path.join(base, "reliability-data", "data"), "DATA"),
           (os.path.join(base, "reliability-data", "config.py"), "CONFIG")]
  print("| # | tool | bad input | exit | stderr lines | traceback | message |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for n, (what, tool, _, _) in enumerate(CASES, 1):
    status, stderr, _ = outcomes[what]
    lines = stderr.strip().splitlines()
    message = lines[-1] if lines else ""
    for path, name in short:
      message = message.replace(path, name)
    if len(message) > 190:
      message = message[:187] + "..."
    message = message.replace("|", "\\|")
    print(f"| {n} | {tool} | {what} | {status} | {len(lines)} | "
          f"{'yes' if 'Traceback' in stderr else 'no'} | `{message}` |")


if __name__ == "__main__":
  main(sys.argv[1])
