"""The run directory (`--workdir`): an exclusive lock, up-front usability checks, outputs that
never overwrite each other, and one-line errors for failed writes.

  WorkdirLock(workdir)          held for a whole train/eval/sample run: a second process on the
                                same workdir fails at once with `WorkdirBusyError` naming the PID
                                (and host) holding it, instead of interleaving metrics and
                                checkpoints. It is an OS advisory lock (`flock`) on
                                `<workdir>/.lock`: the kernel releases it when the process exits or
                                dies, so a crashed run never leaves a stale lock behind.
  prepare_writable_workdir(p)   for training: creates the directory (and its parents) and proves
                                it is writable by creating and removing a probe file.
  require_existing_workdir(p)   for eval/sample: the directory must already exist (a mistyped path
                                is an error, never a new empty workdir), and be writable when the
                                mode writes results into it.
  unique_path(dir, stem, sfx)   `stem.sfx`, else `stem_1.sfx`, `stem_2.sfx`, ...: created with
                                O_EXCL, so an existing file is never overwritten.
  os_error_to_user_error(e, w)  ENOSPC/EDQUOT -> DiskFullError, EROFS/EACCES/EPERM -> StorageError,
                                one line naming what was being written and the fix.

Writability is tested by really writing, never with `os.access`: as root (containers, CI),
`os.access` and permission bits say "writable" even on a read-only mount.
"""

import datetime
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
from typing import Optional

from bdiff_jax.errors import DiskFullError, StorageError, UserError, WorkdirBusyError, WorkdirError

LOCK_FILE = ".lock"
_PROBE_PREFIX = ".write-probe-"

# Messages of storage errors that reach us as text only (tensorstore, used by orbax, raises
# ValueError("... [OS error: No space left on device]") instead of OSError).
_ERRNO_BY_MESSAGE = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
    ("Operation not permitted", errno.EPERM),
)


class WorkdirLock:
  """Exclusive advisory lock on `<workdir>/.lock`, as a context manager.

  The lock file records the holder as JSON: {"pid", "host", "started" (ISO time), "argv"}; it is
  left in place on release (removing it would race with a process about to lock it). `flock`
  locks belong to the open file, so even a second `WorkdirLock` in the same process conflicts.
  The workdir must exist (see `prepare_writable_workdir` / `require_existing_workdir`).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusyError (never waits)."""
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
    try:
      # No O_TRUNC: the file of a current holder must survive until we own the lock.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise os_error_to_user_error(e, f"creating the lock file {self.path}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise os_error_to_user_error(e, f"locking {self.path}") from None
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by {_describe_holder(read_lock_holder(self.path))}.",
          "wait for that run to finish (or stop it), or pass another --workdir; two runs in one "
          "workdir would mix their checkpoints and metrics.") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(sys.argv)}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    except OSError as e:
      os.close(fd)
      raise os_error_to_user_error(e, f"writing the lock file {self.path}") from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def read_lock_holder(path: str) -> Optional[dict]:
  """The holder record in a lock file, or None when it is empty or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.loads(f.read() or "null")
  except (OSError, ValueError):
    return None


def _describe_holder(holder: Optional[dict]) -> str:
  if not isinstance(holder, dict) or "pid" not in holder:
    return "another process (it has not recorded its PID yet)"
  where = f" on host {holder['host']}" if holder.get("host") else ""
  since = f", running since {holder['started']}" if holder.get("started") else ""
  return f"another process: PID {holder['pid']}{where}{since}"


def _probe_write(directory: str) -> None:
  """Creates, writes and removes a probe file in `directory`.

  Raises:
    OSError: without a file name (the probe's name would only confuse the message).
  """
  path = os.path.join(directory, f"{_PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
      os.write(fd, b"probe\n")
    finally:
      os.close(fd)
      os.unlink(path)
  except OSError as e:
    raise OSError(e.errno, e.strerror) from None


def prepare_writable_workdir(path: str | os.PathLike) -> str:
  """Creates the training workdir (and its parents) and proves it writable; returns its abspath.

  Raises:
    WorkdirError: the path is a regular file, or a parent component is a file.
    StorageError / DiskFullError: the directory (or its parent, when it must be created) is
      read-only, not permitted, on a read-only file system, or on a full disk.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a directory.",
                       "pass a directory path (a new one is created) as --workdir.")
  if not os.path.isdir(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      if e.errno in (errno.ENOTDIR, errno.EEXIST):
        raise WorkdirError(f"--workdir {path} cannot be created: a part of that path is a "
                           "file, not a directory.", "pass another --workdir.") from None
      parent = _deepest_existing_parent(path)
      raise os_error_to_user_error(e, f"creating --workdir {path} (in {parent})") from None
  try:
    _probe_write(path)
  except OSError as e:
    raise os_error_to_user_error(e, f"writing into --workdir {path}") from None
  return path


def require_existing_workdir(path: str | os.PathLike, *, writable: bool = True) -> str:
  """Checks that an existing workdir is there (eval/sample never create one); returns abspath.

  Args:
    path: the --workdir of a trained run.
    writable: also prove it writable (eval and sample write results into it), so that a
      read-only workdir fails before anything is computed.

  Raises:
    WorkdirError: no such directory, or the path is a file.
    StorageError / DiskFullError: `writable` and writing into it fails.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise WorkdirError(f"no such workdir: {path}.",
                       "pass the --workdir of a trained run (it holds checkpoints/ and "
                       "config.json), or train first with --mode=train.")
  if not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a directory.",
                       "pass the --workdir directory of a trained run.")
  if writable:
    try:
      _probe_write(path)
    except OSError as e:
      raise os_error_to_user_error(e, f"writing results into --workdir {path}") from None
  return path


def _deepest_existing_parent(path: str) -> str:
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  return parent


def unique_path(directory: str | os.PathLike, stem: str, suffix: str) -> str:
  """Creates and returns a new empty file `<directory>/<stem><suffix>` that did not exist.

  When that name is taken, `<stem>_1<suffix>`, `<stem>_2<suffix>`, ... are tried. Each attempt is
  an O_CREAT|O_EXCL open, so two processes never get the same name and nothing existing is ever
  overwritten. Open the returned path with mode "w" to fill it.

  Args:
    directory: an existing directory.
    stem: the file name without suffix, e.g. "samples_step40".
    suffix: e.g. ".txt" (may be empty).

  Raises:
    StorageError / DiskFullError: the file cannot be created.
  """
  directory = os.fspath(directory)
  for k in range(100_000):
    name = f"{stem}{suffix}" if k == 0 else f"{stem}_{k}{suffix}"
    path = os.path.join(directory, name)
    try:
      os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
      return path
    except FileExistsError:
      continue
    except OSError as e:
      raise os_error_to_user_error(e, f"creating {path}") from None
  raise StorageError(f"{directory} already holds 100,000 files named {stem}_<k>{suffix}.",
                     "move old outputs out of the workdir.")


def os_error_to_user_error(e: OSError, what: str, *, fix: Optional[str] = None) -> UserError:
  """A one-line UserError for an OSError raised while doing `what` (to raise `from None`).

  Args:
    e: the error; its errno picks the class and the default fix.
    what: what was being done, e.g. "saving checkpoint 40 in /runs/a".
    fix: replaces the default fix for permission / read-only / other errors (disk-full errors
      keep theirs, which is always "free space").

  Returns:
    DiskFullError for ENOSPC / EDQUOT; StorageError for EROFS, EACCES, EPERM and anything else.
  """
  name = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in what else ""
  code = e.errno
  if code == errno.ENOSPC:
    return DiskFullError(f"{what} failed: no space left on the device{name}.",
                         "free disk space (or use a directory on another disk) and rerun; "
                         "files written before are intact.")
  if code == errno.EDQUOT:
    return DiskFullError(f"{what} failed: the disk quota is exhausted{name}.",
                         "free space within your quota (or use another disk) and rerun; files "
                         "written before are intact.")
  if code == errno.EROFS:
    return StorageError(f"{what} failed: the file system is read-only{name}.",
                        fix or "pass a --workdir on a writable file system.")
  if code in (errno.EACCES, errno.EPERM):
    return StorageError(f"{what} failed: permission denied{name}.",
                        fix or "make the directory writable for this user, or pass another "
                        "--workdir.")
  reason = e.strerror or type(e).__name__
  return StorageError(f"{what} failed: {reason}{name}.",
                      fix or "check the disk and the path, then rerun.")


def find_os_error(e: BaseException) -> Optional[OSError]:
  """The OSError behind `e`: `e` itself, one in its __cause__/__context__ chain, or one recognised
  from the message (tensorstore reports disk errors as ValueError text). None when there is none.
  """
  seen = set()
  chain = e
  while chain is not None and id(chain) not in seen:
    seen.add(id(chain))
    if isinstance(chain, OSError) and chain.errno is not None:
      return chain
    chain = chain.__cause__ or chain.__context__
  chain = e
  seen.clear()
  while chain is not None and id(chain) not in seen:
    seen.add(id(chain))
    text = str(chain)
    for needle, code in _ERRNO_BY_MESSAGE:
      if needle in text:
        return OSError(code, os.strerror(code))
    chain = chain.__cause__ or chain.__context__
  return None


def write_atomically(path: str | os.PathLike, write, what: str) -> str:
  """Publishes a file only complete: `write(tmp)` fills a private temporary file next to `path`,
  which is flushed to disk and renamed over `path` (`os.replace`). A crash, a kill or a full disk
  leaves the previous `path` as it was (and no temporary file, except after SIGKILL: a hidden
  `.<name>.tmp-*` that is never read). Returns `path`.

  Args:
    path: the file to create or replace.
    write: called with the temporary file's path; writes the whole content there.
    what: what is being written, for the error message, e.g. "the GLUE results glue.json".

  Raises:
    StorageError / DiskFullError: writing or renaming failed; `path` is unchanged.
  """
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    try:
      write(tmp)
      fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
      os.replace(tmp, path)
    except BaseException:
      try:
        os.unlink(tmp)
      except OSError:
        pass
      raise
    try:  # the rename itself survives a power loss once the directory is synced
      dfd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
      try:
        os.fsync(dfd)
      finally:
        os.close(dfd)
    except OSError:
      pass  # some file systems cannot sync a directory; the file is complete either way
  except OSError as e:
    raise os_error_to_user_error(e, f"writing {what} ({path})") from None
  return path


def write_text_atomically(path: str | os.PathLike, text: str, what: str) -> str:
  """`write_atomically` of a UTF-8 text."""

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  return write_atomically(path, write, what)


def remove_if_unused(workdir: str) -> None:
  """Removes a workdir this run created when it was refused before it recorded anything (no
  checkpoint, no metrics record: e.g. a train step that does not fit in memory), so that a
  refusal leaves no workdir behind. Anything recorded keeps the whole workdir."""
  for folder in ("checkpoints", "checkpoints_best"):
    path = os.path.join(workdir, folder)
    if os.path.isdir(path) and os.listdir(path):
      return
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics) and os.path.getsize(metrics):
    return
  shutil.rmtree(workdir, ignore_errors=True)
