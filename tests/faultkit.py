"""The fault and bad-input suite's harness (issue 20): run the CLI in-process, classify what happened, and check
what is left on disk.

Every case of ``tests/test_faults_*.py`` ends in one of four outcomes:

- ``clean``: exit status 2 (or 130 after an interrupt) and exactly one line on stderr, ``quantkit: error: ...``,
  no traceback;
- ``traceback``: an exception escaped ``main``, or stderr holds a traceback;
- ``wrong``: exit 0, but the result is wrong (the case's own check says so);
- ``loss``: a protected file or folder (the source model, an earlier good output) changed.

``census`` tallies the outcomes of every case for the closing note (``python tests/faultkit.py`` runs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

_PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar (stderr is not a terminal: each update on one \r line)
LEFTOVER_SUFFIXES = (".quantkit-partial", ".quantkit-tmp", ".quantkit-old", ".quantkit-lock")


@dataclass
class Outcome:
    code: int | None  # exit status; None when an exception escaped main
    out: str
    err: str
    exc: BaseException | None = None
    tb: str = ""

    @property
    def error_lines(self) -> list[str]:
        """stderr without log records (``INFO ...``/``WARNING ...``) and without progress bars."""
        lines = re.split(r"[\r\n]", self.err)
        return [ln for ln in lines if ln.strip() and not ln.startswith(("INFO ", "DEBUG ", "WARNING "))
                and not _PROGRESS.search(ln)]

    @property
    def kind(self) -> str:
        if self.exc is not None or "Traceback (most recent call last)" in self.err:
            return "traceback"
        if self.code in (2, 130) and len(self.error_lines) == 1 and self.error_lines[0].startswith("quantkit: "):
            return "clean"
        if self.code == 0:
            return "ok"
        return "other"

    def __str__(self) -> str:
        return f"exit {self.code}, stderr:\n{self.err}{self.tb}"


def run_cli(*argv: str | os.PathLike, env: dict[str, str] | None = None) -> Outcome:
    """``quantkit ARGV`` in this process, with stdout and stderr captured."""
    from quantkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
            except BaseException as e:  # noqa: BLE001 - the point is to see it
                return Outcome(None, out.getvalue(), err.getvalue(), e, traceback.format_exc())
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Outcome(code, out.getvalue(), err.getvalue())


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (and each path's existence), to compare before and after."""
    digest: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            digest[str(root)] = "<absent>"
        elif root.is_file():
            digest[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        else:
            for p in sorted(root.rglob("*")):
                digest[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return digest


@contextlib.contextmanager
def killed_after_layer(layer: int):
    """Within the block, a quantize run is interrupted (``KeyboardInterrupt``, as a kill would) right after it saved
    decoder layer ``layer``'s progress (``quantkit.resume.Progress.save_layer``); the real method is back
    afterwards. A library call raises it (``with killed_after_layer(1), pytest.raises(KeyboardInterrupt): ...``),
    the CLI exits 130."""
    from quantkit import resume

    real = resume.Progress.save_layer

    def save_then_die(self, i, *args, **kwargs):
        real(self, i, *args, **kwargs)
        if i == layer:
            raise KeyboardInterrupt

    resume.Progress.save_layer = save_then_die
    try:
        yield
    finally:
        resume.Progress.save_layer = real


def leftovers(folder: Path) -> list[str]:
    """quantkit's temporary files and folders under ``folder`` (there should be none after any run)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.name.endswith(LEFTOVER_SUFFIXES)
                  or ".tmp." in p.name)


@dataclass
class Guard:
    """Protected paths whose bytes must not change, and a folder that must hold no leftovers afterwards."""

    protected: list[Path]
    workdir: Path
    before: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.before = snapshot(*self.protected)

    def check_loss(self) -> None:
        after = snapshot(*self.protected)
        changed = sorted(k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k))
        assert not changed, f"data loss: {changed[:5]}"

    def check(self) -> None:
        self.check_loss()
        assert not leftovers(self.workdir), f"left behind: {leftovers(self.workdir)}"


def expect_clean(o: Outcome, *phrases: str, code: int = 2, guard: Guard | None = None) -> str:
    """Assert a clean one-line error containing every phrase; returns the line. With ``guard``, the protected
    paths are checked first (data loss is the worse failure) and the leftovers last."""
    if guard is not None:
        guard.check_loss()
    assert o.kind == "clean", f"expected one clean error line, got {o.kind}: {o}"
    assert o.code == code, str(o)
    line = o.error_lines[0]
    for p in phrases:
        assert p in line, f"{p!r} not in {line!r}"
    if guard is not None:
        guard.check()
    return line


if __name__ == "__main__":
    import subprocess
    import sys

    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__).parent), "-k", "faults", *sys.argv[1:]]))
