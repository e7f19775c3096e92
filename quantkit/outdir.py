"""The output folder of a quantization run, and the files beside it.

``OUT`` is only ever written by publishing a finished folder in renames. Beside it live, while a run is under way:

- ``OUT.quantkit-lock``: an exclusive advisory lock (``flock``) held for the whole run, so a second run on the same
  ``OUT`` fails at once; the kernel releases it when its process dies, so a killed run never leaves a stale lock;
- ``OUT.quantkit-partial/``: the per-layer progress (quantkit.resume);
- ``OUT.quantkit-tmp/``: the folder being assembled, complete once its marker file is written (last);
- ``OUT.quantkit-old/``: the previous output between the two renames of a publish.

The states of a publish, and what the next run (holding the lock) does on finding each (:meth:`recover`):

==========================================  ===============================================================
found                                        meaning, and the repair
==========================================  ===============================================================
``tmp`` without marker                        assembly was interrupted: remove ``tmp`` (rebuilt from progress)
``old`` and no ``OUT``, ``tmp`` complete      killed between the renames: rename ``tmp`` to ``OUT``
``old`` and no ``OUT``, no complete ``tmp``   cannot happen in order; restore ``old`` to ``OUT``
``old`` and ``OUT``                           killed after the renames: remove ``old``
==========================================  ===============================================================

The marker, ``.quantkit-output.json``, names the run's fingerprint and every file quantkit wrote in ``OUT``:
``--overwrite`` replaces only a folder with a marker and no other files, so it never deletes a folder (or a
source model) that quantkit did not write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

__all__ = ["MARKER", "OutputFolder"]

logger = logging.getLogger(__name__)

MARKER = ".quantkit-output.json"
MARKER_VERSION = 1


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


class OutputFolder:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.lock_file = self._beside("lock")
        self.partial = self._beside("partial")
        self.tmp = self._beside("tmp")
        self.old = self._beside("old")
        self._lock_fd: int | None = None

    def _beside(self, what: str) -> Path:
        return self.out.with_name(f"{self.out.name}.quantkit-{what}")

    # -- checks before anything is written -------------------------------------------------------------------

    def check_not_source(self, *sources: Path) -> None:
        """``OUT`` may not be a source (model folder or file), lie inside one, or contain one."""
        out = self.out.resolve()
        for src in sources:
            src = Path(src).resolve()
            if out == src:
                raise QuantkitError(f"--out {self.out} is the source model; choose another folder")
            if src in out.parents:
                raise QuantkitError(f"--out {self.out} is inside the source model folder {src}; choose a folder "
                                    "outside it")
            if out in src.parents:
                raise QuantkitError(f"--out {self.out} contains the source model {src}; choose another folder")

    def holds(self, fingerprint: str, overwrite: bool) -> bool:
        """True when ``OUT`` already holds exactly this result. Raises when it holds something that may not be
        replaced: anything without ``overwrite``, and even with it a folder quantkit did not write."""
        out = self.out
        if not out.exists():
            return False
        if not out.is_dir():
            raise QuantkitError(f"--out {out} exists and is not a folder")
        present = sorted(p.name for p in out.iterdir())
        if not present:
            return False
        marker = _read_marker(out)
        if marker is not None and marker.get("fingerprint") == fingerprint and set(marker["files"]) | {MARKER} == set(
                present):
            return True
        self._check_replaceable(overwrite)
        return False

    def _check_replaceable(self, overwrite: bool) -> None:
        """Raise unless the non-empty ``OUT`` may be replaced."""
        marker = _read_marker(self.out)
        if marker is None:
            raise QuantkitError(f"--out {self.out} holds files quantkit did not write (no {MARKER}); it is never "
                                "replaced, not even with --overwrite: choose another folder or empty it yourself")
        foreign = sorted({p.name for p in self.out.iterdir()} - set(marker["files"]) - {MARKER})
        if foreign:
            raise QuantkitError(f"--out {self.out} holds files quantkit did not write ({', '.join(foreign[:3])}); "
                                "it is never replaced: move them or choose another folder")
        if not overwrite:
            raise QuantkitError(f"--out {self.out} already holds a different result (other model weights, recipe, "
                                "calibration or settings); pass --overwrite to replace it")

    # -- the lock --------------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the exclusive lock on ``OUT`` or fail at once naming the process that holds it."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise QuantkitError(f"another quantkit run (pid {holder}) is writing {self.out}; wait for it "
                                        f"to finish (lock: {self.lock_file})") from None
                raise
            # The file we locked may have been unlinked by a run that just finished: lock the one on disk.
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        self.lock_file.unlink(missing_ok=True)  # while still held: nobody can lock this inode and then lose it
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> OutputFolder:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- publishing ------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish or undo a publish that a killed run left half done (the table in the module docstring)."""
        assert self._lock_fd is not None, "recover() needs the lock"
        tmp_complete = self.tmp.is_dir() and _read_marker(self.tmp) is not None
        if self.old.exists():
            if self.out.exists():
                logger.info("removing %s, left by an interrupted publish", self.old)
                shutil.rmtree(self.old)
            elif tmp_complete:
                logger.info("finishing an interrupted publish of %s", self.out)
                os.replace(self.tmp, self.out)
                shutil.rmtree(self.old)
            else:
                logger.info("restoring %s from an interrupted publish", self.out)
                os.replace(self.old, self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def write_marker(self, folder: Path, fingerprint: str) -> None:
        """The last file of a finished folder: its fingerprint and every file in it."""
        files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
        marker = {"written_by": "quantkit", "version": MARKER_VERSION, "fingerprint": fingerprint, "files": files}
        path = folder / MARKER
        path.write_text(json.dumps(marker, indent=2) + "\n")
        with open(path, "rb") as f:
            os.fsync(f.fileno())

    @contextmanager
    def build(self, fingerprint: str, overwrite: bool) -> Iterator[Path]:
        """An empty ``tmp`` to write the output into; when the block ends, the folder is marked complete and
        published, and if anything in it (or the publishing) fails, ``tmp`` is removed."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        try:
            yield self.tmp
            self.write_marker(self.tmp, fingerprint)
            self.publish(overwrite)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def publish(self, overwrite: bool) -> None:
        """Rename the finished ``tmp`` onto ``OUT``; an old ``OUT`` is moved aside first and removed last."""
        if _read_marker(self.tmp) is None:
            raise RuntimeError(f"{self.tmp} is not complete; refusing to publish it")
        if self.out.exists() and any(self.out.iterdir()):
            self._check_replaceable(overwrite)  # it may have changed during the run (not by quantkit: we hold the lock)
            os.replace(self.out, self.old)
        elif self.out.exists():
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        if self.old.exists():
            shutil.rmtree(self.old)
