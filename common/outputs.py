"""Output folders: written whole or not at all, and replaced only when this project wrote them.

A folder is staged as ``.NAME.partial-HOST-PID-XXXX`` beside its target and renamed into place at
the end (other scratch beside it, ``.NAME.KIND-HOST-PID-XXXX``, is named the same way). The host
and pid in the name let a later run on the same output find what a killed run (kill -9, power
loss) left and remove it. ``--force`` replaces only an empty folder or one that holds one of the
caller's marker files (conversion.json, recipe.yaml, ...): never an input, the current folder,
one of their ancestors, or a folder someone else made.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.markup import escape

from .console import console
from .errors import UserError

HOST = socket.gethostname().replace("-", "_")
# EFBIG is a file-size limit (ulimit -f, a filesystem's largest file): for the user, the disk is full
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def stage_prefix(target: Path, kind: str = "partial") -> str:
    """Name start of a stage beside target: kind ("partial", "old", "activations"), then this host and pid."""
    return f".{_absolute(target).name}.{kind}-{HOST}-{os.getpid()}-"


def _absolute(target: Path) -> Path:
    """target as an absolute path without `.` or `..`: its name and parent, however the user spelled it."""
    return Path(os.path.abspath(target))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_stages(target: Path) -> list[Path]:
    """Staging folders beside target left by runs on this host whose process is gone."""
    target = _absolute(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z]+-(?P<host>[^-]+)-(?P<pid>\d+)-")
    stale = []
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and match["host"] == HOST and not _alive(int(match["pid"])):
            stale.append(path)
    return sorted(stale)


def remove_stale_stages(target: Path) -> list[Path]:
    """Remove what killed runs left beside target; returns what was removed (for the caller to report)."""
    removed = stale_stages(target)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def check_output_path(target: Path, folder: bool = True) -> None:
    """Refuse in one line an output path that cannot be made: a link to nothing, or a file where a
    folder on its way must be (or, for an output folder, where the folder itself must be)."""
    target = _absolute(target)
    if folder and target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not an output folder; choose another output")
    for path in (target, *target.parents):
        if path.is_symlink() and not path.exists():
            raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist; choose another output "
                            "or remove the link")
        if path != target and path.exists():
            if not path.is_dir():
                raise UserError(f"cannot write {target}: {path} is a file, not a folder; choose another output")
            return


def check_outside_inputs(target: Path, inputs: dict[str, str | Path | None], option: str = "--out") -> None:
    """Refuse in one line an output that is one of a stage's inputs or lies inside one: the stage
    would write into what it reads (a model folder, a data folder, a text)."""
    resolved = Path(target).expanduser().resolve()
    for role, item in inputs.items():
        if item is None:
            continue
        item = Path(item).expanduser().resolve()
        if resolved == item or item in resolved.parents:
            raise UserError(f"{option} {target} is inside the input {role} {item}: the stage would write into what "
                            f"it reads; choose another {option}")


def check_replaceable(target: Path, markers: Iterable[str], inputs: Iterable[Path] = ()) -> None:
    """Refuse, in one line, to replace target unless this project wrote it (or it is empty) and it holds no input."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"--force will not replace {target}: it is the current folder or one above it; choose another output")
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise UserError(f"--force will not replace {target}: it holds the input {item}; choose another output")
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file, not an output folder; choose another output")
    markers = tuple(markers)
    if not any((target / marker).is_file() for marker in markers) and any(target.iterdir()):
        raise UserError(f"--force replaces only a folder this project wrote, and {target} has no "
                        f"{' or '.join(markers)}; choose another output or remove it yourself")


def claim_target(target: Path, force: bool, markers: Iterable[str], inputs: Iterable[Path] = ()) -> None:
    """Remove (and say so) what killed runs left beside target, then refuse in one line an output that
    exists without force or must not be replaced. atomic_folder starts with it; a caller with long
    work ahead (a fit, a training run) calls it first too, so a refusal comes before the work."""
    check_output_path(target)
    removed = remove_stale_stages(target)
    if removed:
        console.print(f"removed {', '.join(p.name for p in removed)}: left beside {escape(str(target))} by a killed run",
                      highlight=False, soft_wrap=True)
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    check_replaceable(target, markers, inputs)


def os_error_line(err: BaseException, where: Path) -> str | None:
    """One line for the OS errors a user can fix (full disk, no permission), found in err or what
    it was raised from (torch and datasets wrap the OSError of a failed write); None for the others."""
    cause = user_os_error(err)
    if cause is None:
        return None
    if cause.errno in FULL:
        reason = " (a file-size limit)" if cause.errno == errno.EFBIG else ""
        return f"disk full while writing {where}{reason}: free some space and run again (nothing was kept)"
    # named by the output the user chose: the file that failed is often a hidden stage
    return f"cannot write {where}: {os.strerror(cause.errno).lower()}"


def user_os_error(err: BaseException | None) -> OSError | None:
    """The full-disk or permission OSError in err's chain (__cause__, __context__), if there is one."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL + DENIED:
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def user_os_errors(where: Path) -> Iterator[None]:
    """OS errors a user can fix become one-line UserErrors, also where a library wrapped them; the
    others stay tracebacks."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        line = os_error_line(err, where)
        if line is None:
            raise
        raise UserError(line) from err


@contextlib.contextmanager
def made_folder(folder: Path) -> Iterator[Path]:
    """`mkdir -p folder` for the block; if the block fails, the folders this made are removed again."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except BaseException:
        for made in created:
            with contextlib.suppress(OSError):  # not empty: another run writes there too
                made.rmdir()
        raise


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool, markers: Iterable[str], inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a staging folder beside target; it replaces target only if the block succeeds.

    An existing target needs force, and then must be a folder this project wrote (one of markers)
    that holds none of inputs (claim_target). If the block fails or the process is interrupted
    (KeyboardInterrupt; run.py turns SIGTERM into one), the stage and any parent folders made for
    it are removed.
    """
    claim_target(target, force, markers, inputs)
    target = _absolute(target)
    with user_os_errors(target), made_folder(target.parent):
        tmp = Path(tempfile.mkdtemp(prefix=stage_prefix(target), dir=target.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should read like any folder made here
            yield tmp
            swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def swap_in(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an old target is removed only once the new one is in place."""
    if not target.exists():
        tmp.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=stage_prefix(target, "old"), dir=target.parent))
    target.rename(aside / target.name)
    try:
        tmp.rename(target)
    except BaseException:
        (aside / target.name).rename(target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold the lock file at path for the block, waiting for whoever holds it (one builder of a shared
    cache at a time; the others find its result when they get the lock). The holder removes the file
    before it lets go, so none is left behind; a waiter that then wakes on the removed file takes
    the lock again on the path's new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = path.open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if _same_file(fh, path):
                break
        except BaseException:
            fh.close()
            raise
        fh.close()  # its holder removed it: lock the one at path now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fh.close()  # closing releases the lock


def _same_file(fh, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), path.stat())
    except FileNotFoundError:
        return False

