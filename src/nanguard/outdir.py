"""The out dir of one run: one writer at a time, a manifest of what nanguard wrote, nothing else touched.

Rules (``docs/reliability.md`` says how each is tested):

* **One writer.** A run holds ``OUT/.nanguard.lock`` (an ``flock``, released by the kernel when the process
  ends, even under ``kill -9``) for as long as it writes. A second writer, another process or another Guard
  in this process, finds it held and writes into a fresh sub-directory ``OUT/nanguard-run-N`` instead; one
  line on stderr names the holder and the sub-directory. Two writers never share a file.
* **A manifest.** ``OUT/.nanguard_manifest.json`` lists every file and folder the run created, added
  *before* it is created. The next run in ``OUT`` sets aside into ``OUT/previous/<time>/`` exactly those
  entries (one line on stderr says what moved where) and never touches anything else.
* **Nothing of the user's.** If ``OUT`` holds a file this run would write that no manifest lists (the user's
  own ``report.md``, an older tool's ``events.jsonl``), the run writes into a fresh sub-directory, as for a
  held lock, and says so.

An out dir that cannot be a directory (a file is in the way, no permission, a read-only file system) is a
:class:`~nanguard.errors.UsageError` naming it, raised before training starts. A full disk is not: the
records degrade (see :mod:`nanguard.records`) and training goes on.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nanguard.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process registry below is the only lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".nanguard.lock"
MANIFEST_NAME = ".nanguard_manifest.json"
PREVIOUS = "previous"
SUBDIR_PREFIX = "nanguard-run-"
MAX_SUBDIRS = 100
# Errors that say the path can never be this run's out dir: the user must pick another (exit status 2).
_CONFIG_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                  errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP}
_HELD_HERE: dict[str, float] = {}  # out dirs this process holds -> since when (names the holder in a message)


class OutDir:
    """The directory a run writes to, with its lock and manifest. Build it with :func:`open_out_dir`."""

    def __init__(self, path: Path, lock_fd: int | None, entries: list[str]) -> None:
        self.path = path
        self.entries = entries
        self.manifest_error: str | None = None
        # An out dir whose run is never closed is let go when it is garbage-collected (or the process ends).
        self._release = weakref.finalize(self, _let_go, str(path.resolve()), lock_fd)

    def claim(self, name: str) -> Path | None:
        """Record ``name`` as this run's before creating it; ``None`` if a file nanguard did not write is there."""
        target = self.path / name
        if name in self.entries:
            return target
        if os.path.lexists(target):
            return None
        self.entries.append(name)
        self._save()
        return target

    def unique(self, name: str) -> Path:
        """``name``, or ``stem.N.suffix`` when a file nanguard did not write holds the name (claimed either way)."""
        stem, dot, suffix = name.partition(".")
        for number in range(1, MAX_SUBDIRS + 1):
            candidate = name if number == 1 else f"{stem}.{number}{dot}{suffix}"
            claimed = self.claim(candidate)
            if claimed is not None:
                return claimed
        raise UsageError(f"{self.path} holds {name} and {MAX_SUBDIRS} numbered copies nanguard did not write")

    def _save(self) -> None:
        payload = {"written_by": "nanguard", "pid": os.getpid(), "entries": self.entries}
        try:
            write_json_atomic(self.path / MANIFEST_NAME, payload)
        except OSError as exc:  # a full disk: this run's files will look foreign to the next run, the safe side
            self.manifest_error = f"{exc.strerror or exc}"

    def release(self) -> None:
        """Let the next writer in (the kernel also does this when the process ends)."""
        self._release()


def _let_go(key: str, fd: int | None) -> None:
    _HELD_HERE.pop(key, None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def open_out_dir(requested: str | os.PathLike[str], planned: Iterable[str]) -> tuple[OutDir, list[str]]:
    """Take ``requested`` (or a fresh sub-directory of it) for a run that may write ``planned``.

    Returns the out dir and the lines to tell the user (what was set aside, why a sub-directory).
    """
    root = Path(requested)
    names = list(planned)
    notes: list[str] = []
    held, reason = _take(root, names, notes)
    if held is not None:
        return held, notes
    for number in range(2, MAX_SUBDIRS + 2):
        sub = root / f"{SUBDIR_PREFIX}{number}"
        if os.path.lexists(sub) and not sub.is_dir():
            continue
        held, _ = _take(sub, names, notes)
        if held is not None:
            notes.insert(0, f"{root} {reason}; this run writes to {sub} instead")
            return held, notes
    raise UsageError(f"out dir {str(root)!r} {reason}, and so are {MAX_SUBDIRS} sub-directories "
                     f"{SUBDIR_PREFIX}N in it: pass another out dir")


def _take(path: Path, planned: list[str], notes: list[str]) -> tuple[OutDir | None, str]:
    """Lock ``path`` and set aside its previous run; (None, why) if it is held or holds foreign files."""
    _make_dir(path)
    fd, holder = _lock(path)
    if fd is None and holder is not None:
        return None, f"is in use by {holder}"
    entries = _read_manifest(path)
    foreign = [name for name in [*planned, PREVIOUS] if os.path.lexists(path / name) and name not in entries]
    if foreign:
        _unlock(path, fd)
        return None, f"holds {', '.join(foreign)} that nanguard did not write (left untouched)"
    ours = [name for name in entries if name != PREVIOUS and os.path.lexists(path / name)]
    keep = [PREVIOUS] if PREVIOUS in entries and (path / PREVIOUS).is_dir() else []
    if ours:
        moved = _set_aside(path, ours)
        if moved is None:
            _unlock(path, fd)
            return None, "holds a previous run's files that could not be set aside"
        keep = [PREVIOUS]
        notes.append(f"set aside the previous run's {', '.join(ours)} in {moved}{_growth(path / PREVIOUS)}")
    out = OutDir(path, fd, keep)
    out._save()
    _HELD_HERE[str(path.resolve())] = time.time()
    return out, ""


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _CONFIG_ERRNOS or isinstance(exc, (FileExistsError, NotADirectoryError)):
            what = "is not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
                else f"cannot be created ({exc.strerror})"
            raise UsageError(f"out dir {str(path)!r} {what}: pass a directory nanguard may write to "
                             "(it is created if missing)") from exc
        raise  # a full disk or an I/O error: the caller degrades to a run without records


def _lock(path: Path) -> tuple[int | None, str | None]:
    """(fd, None) when this run holds the lock; (None, holder) when another writer does; (None, None): no lock
    could be made (a full disk), the run goes on without one."""
    key = str(path.resolve())
    if key in _HELD_HERE:
        return None, f"another Guard in this process (pid {os.getpid()}, since {_clock(_HELD_HERE[key])})"
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in _CONFIG_ERRNOS:
            raise UsageError(f"out dir {str(path)!r} is not writable ({exc.strerror}): pass a directory "
                             "nanguard may write to") from exc
        return None, None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            return None, holder
    _describe_holder(fd)
    return fd, None


def _unlock(path: Path, fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _describe_holder(fd: int) -> None:
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                       "command": " ".join(sys.argv)[:200]})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds without its description
        pass


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another nanguard run"
    where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    command = f" ({info['command']})" if info.get("command") else ""
    since = f", since {_clock(float(info['since']))}" if isinstance(info.get("since"), (int, float)) else ""
    return f"pid {info['pid']}{where}{command}{since}"


def _clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp))


def _read_manifest(path: Path) -> list[str]:
    try:
        payload = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = payload.get("entries") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        return []
    return [name for name in entries if isinstance(name, str) and name and "/" not in name and name not in ("..", ".")]


def _set_aside(path: Path, names: list[str]) -> Path | None:
    """Move ``names`` (and the manifest that lists them) into ``previous/<time>/``; None if that failed."""
    base = path / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    target, suffix = base, 0
    while os.path.lexists(target):
        suffix += 1
        target = base.with_name(f"{base.name}.{suffix}")
    try:
        target.mkdir(parents=True)
        for name in names:
            (path / name).rename(target / name)
        (path / MANIFEST_NAME).rename(target / MANIFEST_NAME)
    except OSError:
        return None
    return target


def _growth(previous: Path) -> str:
    """"; previous/ holds 4 runs, 12.3 MB": set-aside runs pile up, so say how much (a bounded walk)."""
    try:
        runs = sum(1 for entry in os.scandir(previous) if entry.is_dir())
    except OSError:
        return ""
    total, seen = 0, 0
    for folder, _, files in os.walk(previous):
        for name in files:
            seen += 1
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
        if seen > 10_000:
            return f"; {previous} holds {runs} runs"
    return f"; {previous} holds {runs} run{'s' if runs != 1 else ''}, {total / 1e6:.1f} MB"


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON so that a reader never sees a half-written file; the temporary file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            try:
                tmp.unlink()
            except OSError:
                pass


__all__ = ["LOCK_NAME", "MANIFEST_NAME", "PREVIOUS", "SUBDIR_PREFIX", "OutDir", "open_out_dir", "write_json_atomic"]
