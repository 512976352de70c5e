"""One trainer per workdir: a lock file that the operating system releases when its holder dies.

`W/trainer.lock` holds a POSIX record lock (`fcntl.lockf`) for as long as the trainer runs,
and names its holder (host, pid, start time) for the message a second trainer prints.
The kernel drops the lock when the holding process ends in any way, SIGKILL included, so
a rerun after a crash is never blocked by what the dead run left; on a network file
system the server does the same once the holder's lease runs out (a lost node). Record
locks are per process and not inherited across fork, so data-worker processes never keep
it alive. Of a multi-host run only process 0 takes it: its processes are one trainer.

Where the file system offers no locks, the lock falls back to the holder's record: held
while that process is alive (same host) or while the holder refreshes the file's time
(another host, every `HEARTBEAT_SECONDS`; stale after `STALE_SECONDS`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from munet_jax.errors import UserError

LOCK_NAME = "trainer.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLock:
  """Holds `workdir/trainer.lock` from `acquire` until `release` or the end of the process."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self._heartbeat: threading.Event | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises UserError naming the workdir and the running trainer."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise UserError(f"{self.path}: cannot write the trainer's lock file "
                      f"({e.strerror or e})") from e
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locks = True
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EAGAIN):
        holder = _read_holder(fd)
        os.close(fd)
        raise UserError(self._held_message(holder)) from None
      if e.errno not in _NO_LOCKS:
        os.close(fd)
        raise UserError(f"{self.path}: cannot lock the workdir ({e.strerror or e})") from e
      locks = False
      holder = _read_holder(fd)
      if holder and _alive(holder, os.fstat(fd).st_mtime):
        os.close(fd)
        raise UserError(self._held_message(holder)) from None
    self._fd = fd
    try:
      self._write_holder()
    except OSError as e:
      self.release()
      raise UserError(f"{self.path}: cannot write the trainer's lock file "
                      f"({e.strerror or e})") from e
    if not locks:
      self._start_heartbeat()

  def release(self) -> None:
    if self._heartbeat is not None:
      self._heartbeat.set()
      self._heartbeat = None
    if self._fd is not None:
      os.close(self._fd)   # closing the descriptor drops the record lock
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def _write_holder(self) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)

  def _start_heartbeat(self) -> None:
    stop = threading.Event()
    fd = self._fd

    def beat():
      while not stop.wait(HEARTBEAT_SECONDS):
        try:
          os.utime(fd)
        except OSError:
          pass

    threading.Thread(target=beat, name="trainer-lock-heartbeat", daemon=True).start()
    self._heartbeat = stop

  def _held_message(self, holder: dict | None) -> str:
    who = "another trainer"
    if holder:
      who = (f"another trainer (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
             f"since {holder.get('started', '?')})")
    return (f"{self.workdir}: {who} is running in this workdir; wait for it to end or stop "
            f"it, or train in another --workdir (lock: {self.path})")


def _read_holder(fd: int) -> dict | None:
  try:
    data = os.pread(fd, 4096, 0)
    holder = json.loads(data.decode() or "null")
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def _alive(holder: dict, mtime: float) -> bool:
  """Without file locks: whether the recorded holder still runs."""
  if holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id():
    try:
      os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
      return False
    except PermissionError:
      return True
    return True
  return time.time() - mtime < STALE_SECONDS


def _boot_id() -> str:
  """Tells this boot of this host from the next (a pid is only unique within one)."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """The workdir's trainer lock for the whole run, taken before anything is written.

  Process 0 takes it for all processes of a multi-host run; the others learn from it
  whether they may go on, so a refused run stops on every process with exit status 2.
  """
  lock = WorkdirLock(workdir)
  refusal = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except UserError as e:
      refusal = e
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
    if not int(held) and refusal is None:
      refusal = UserError(f"{os.path.abspath(workdir)}: process 0 of this run could not take "
                          "the workdir's trainer lock (its message says why)")
  if refusal is not None:
    raise refusal
  try:
    yield lock
  finally:
    lock.release()
