"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it; failures are one line."""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.core.errors import UserError

__all__ = ["RERUN", "OutputWriteError", "advice", "atomic_path", "is_disk_error", "write_bytes", "write_text"]

RERUN = "re-run the same command"
TEMP_SUFFIX = ".tmp"  # temporary names are ".<target name>.<random>.tmp", beside the target
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputWriteError(UserError, RuntimeError):
    """A file the harness writes could not be written (disk full, permissions, read-only); the target is untouched."""

    def __init__(self, path: Path, error: OSError, fix: str = RERUN):
        super().__init__(path, error)
        self.path, self.error, self.fix = Path(path), error, fix

    def __str__(self) -> str:
        reason = self.error.strerror or str(self.error)
        if self.error.errno in _FULL:
            remedy = "free disk space"
        elif self.error.errno in _DENIED:
            remedy = f"make {self.path.parent} writable"
        else:
            remedy = "fix that"
        return f"cannot write {self.path} ({reason}); {remedy} and {self.fix}"


def is_disk_error(exc: BaseException) -> bool:
    """Whether `exc` is the file system refusing a write (full, over quota, denied, read-only), not e.g. the network."""
    return isinstance(exc, OSError) and exc.errno in _FULL + _DENIED


@contextmanager
def advice(fix: str) -> Iterator[None]:
    """Inside, a failed write ends its message with `fix` (how to redo what failed) instead of RERUN."""
    try:
        yield
    except OutputWriteError as exc:
        exc.fix = fix
        raise


def _sync(path: Path) -> None:
    """Force the file's data to the disk: a full disk may first show here (delayed allocation, network file systems)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(source: Path, target: Path) -> None:
    """Rename `source` over `target` in one step (same folder, so never a copy)."""
    os.replace(source, target)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable; some platforms and file systems cannot fsync a folder, which costs only durability."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` for a library to write to; it replaces `target` only once complete.

    Any OSError (writing, syncing or renaming) removes the temporary file and becomes one
    OutputWriteError naming `target`; any other exception removes it and propagates unchanged.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    created = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: the name is ours alone; 0o666 lets the umask decide the final file's permissions.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        created = True
        yield tmp
        _sync(tmp)
        _replace(tmp, target)
    except OSError as exc:
        if created:
            tmp.unlink(missing_ok=True)
        raise OutputWriteError(target, exc) from exc
    except BaseException:
        if created:
            tmp.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


def write_bytes(target: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write `data` to `target` atomically; returns the path."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    """Write `text` to `target` atomically, as UTF-8 and exactly as given (no newline translation); returns the path."""
    return write_bytes(target, text.encode("utf-8"))
