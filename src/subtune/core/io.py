"""Atomic, pickle-free file writes and reads (safetensors + JSON), and atomic directories.

An adapter is two files that must change together (the config vouches for the weights with a checksum), so a
directory is written whole: `atomic_directory(path)` hands out an empty temporary sibling, and when the block ends
without error it fsyncs every file and swaps the sibling in.

The swap is Linux's `renameat2(RENAME_EXCHANGE)` (through ctypes): one atomic step that exchanges the two directory
entries, so at every instant `path` names either the complete old directory or the complete new one; the old one,
now under the temporary name, is then deleted. Where the exchange is unavailable (another OS, a filesystem without
it) two renames are used, `path -> .old sibling`, `temporary -> path`; a process killed between them leaves no
`path` but a complete `.old` sibling, which the next save or load renames back (`recover_directory`).

Temporaries carry the writer's pid (`.<name>.subtune-tmp-<pid>-<token>`); the next save removes those whose writer
is no longer running, so a killed save leaves nothing behind for long and a save running in parallel is never
touched. Anything else the old directory held (a README, a run's checkpoints) is carried into the new one as hard
links (copies where links are impossible), so only the adapter's own files change. The directory must not be written
by another process during the swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from subtune.core.errors import AdapterLoadError, AdapterSaveError

TMP_TAG, OLD_TAG = "subtune-tmp", "subtune-old"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


# ----------------------------------------------------------------------------------------------------- single files

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically (fsynced); returns its sha256 so a config can vouch for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _fsync_path(Path(tmp))
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing; point to a directory written by subtune.save()")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save the adapter") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path} is not valid JSON ({e}); re-save the adapter") from None


def read_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing; point to a directory written by subtune.save()")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterLoadError(
            f"{path} does not match the checksum in adapter_config.json (truncated or overwritten); re-save it")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged header or body
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({e}); re-save the adapter") from None


# ------------------------------------------------------------------------------------------------ atomic directories

def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries; False where the OS or filesystem cannot (the caller falls back)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:  # no C library to open (unusual platforms): fall back to two renames
            _LIBC = object()
    return _LIBC


def _writer_pid(sibling: Path, tag: str) -> int | None:
    """The pid in `.<name>.<tag>-<pid>-<token>`, or None if the name is not one of ours."""
    try:
        return int(sibling.name.rsplit(f".{tag}-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _siblings(path: Path, tag: str) -> list[Path]:
    """Our leftovers of `tag` next to `path` whose writer has exited (oldest first)."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.glob(f"{glob.escape('.' + path.name)}.{tag}-*"):
        pid = _writer_pid(p, tag)
        if pid is not None and not _alive(pid):
            found.append(p)
    return sorted(found, key=lambda p: p.lstat().st_mtime if p.exists() else 0.0)


def recover_directory(path: str | Path) -> None:
    """If a save that used the two-rename fallback was killed between its renames, put the old directory back."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return
    old = _siblings(path, OLD_TAG)
    if old:
        os.rename(old[-1], path)


def clean_stale(path: str | Path) -> None:
    """Remove temporaries and `.old` siblings of `path` left by saves that were killed."""
    path = Path(path)
    recover_directory(path)
    for p in _siblings(path, TMP_TAG) + _siblings(path, OLD_TAG):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _carry_over(old: Path, new: Path, replaces: set[str]) -> None:
    """Hard-link what the old directory held into the new one, except the names being replaced or rewritten."""
    for entry in old.iterdir():
        if entry.name in replaces or (new / entry.name).exists() or (new / entry.name).is_symlink():
            continue
        _link_entry(entry, new / entry.name)


def _link_entry(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_entry(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links: copy instead
            shutil.copy2(src, dst)


def _swap_in(tmp: Path, path: Path) -> None:
    """Make `tmp` become `path` (see the module docstring); removes the old directory."""
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now names the old directory
        return
    old = path.parent / f".{path.name}.{OLD_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _resolve_target(path: Path) -> Path:
    path = Path(os.path.realpath(path))  # absolute, `..` resolved, a symlink replaced by the directory it names
    if path.exists() and not path.is_dir():
        raise AdapterSaveError(f"{path} is a file, not a directory; pass a directory path (it is created if missing)")
    return path


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent directories; returns those created (deepest first) so a failure can remove them."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir()
    return missing


def check_writable(directory: str | Path, what: str = "output path") -> None:
    """Fail now, in one line, if `directory` could not be created or written (before hours of training). Creates
    nothing. `what` names the option in the message (e.g. "--output")."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AdapterSaveError(f"cannot write {directory}: {existing} is a file, not a directory; choose another "
                               f"{what} (a writable directory)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".subtune-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AdapterSaveError(f"cannot write {directory}: {existing} is not writable ({e.strerror or e}); choose "
                               f"another {what} (a writable directory) or fix its permissions") from None


@contextlib.contextmanager
def atomic_directory(path: str | Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty directory to fill; on a clean exit it atomically becomes `path` (see the module docstring).

    Entries of the old `path` named in `replaces`, or written anew, are dropped; everything else is carried over.
    On an exception nothing at `path` changes, the temporary is removed, and so are parent directories this call
    created. Operating-system errors (no space, no permission) become one-line AdapterSaveErrors.
    """
    path = _resolve_target(path)
    created: list[Path] = []
    tmp = None
    try:
        created = _make_parents(path.parent)
        clean_stale(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TMP_TAG}-{os.getpid()}-"))
        yield tmp
        _fsync_tree(tmp)  # what the caller wrote; carried-over entries are links to files already on disk
        if path.is_dir():
            _carry_over(path, tmp, set(replaces))
            _fsync_path(tmp)
        cwd = _cwd()
        _swap_in(tmp, path)
        _fsync_path(path.parent)
        _follow_cwd(path, cwd)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first; only the ones this call made, and only if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and not isinstance(e, AdapterSaveError):
            raise AdapterSaveError(f"cannot write {path} ({e.strerror or e}); nothing there was changed: choose a "
                                   "writable directory with free space, or fix its permissions") from e
        raise


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def _follow_cwd(path: Path, cwd: str | None) -> None:
    """A process whose working directory was inside the old directory moves into the new one (same path)."""
    if cwd and (cwd == str(path) or cwd.startswith(str(path) + os.sep)):
        with contextlib.suppress(OSError):
            os.chdir(cwd)
