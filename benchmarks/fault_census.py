"""Tally the fault and bad-input suite (``tests/test_faults_*.py``) by outcome class, for this checkout's quantkit
or for an older tree: the figures of issue 20's closing note.

    python -m benchmarks.fault_census                    # the installed (this checkout's) quantkit
    git worktree add /tmp/old e4b27fe
    python -m benchmarks.fault_census --tree /tmp/old    # the same cases against the code at e4b27fe

Each case's first failed assertion names its class (``tests/faultkit.py``): ``data loss`` (a protected file
changed), ``traceback`` (an exception escaped, or stderr holds one), ``silent`` (exit 0 where an error was due, or
a wrong result), ``left files`` (a clean error that left temporary files behind), ``other exit`` (an error that is
not one clean line, e.g. the catch-all's exit 1), ``not runnable`` (the case needs an interface the tree lacks).
A clean line in other words than the case expects counts as clean.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("clean", "data loss", "traceback", "silent", "left files", "other exit", "not runnable")


def classify(case: ET.Element) -> str:
    failure = case.find("failure")
    error = case.find("error")
    if case.find("skipped") is not None:
        return "skipped"
    if failure is None and error is None:
        return "clean"
    node = failure if failure is not None else error
    message = node.get("message") or ""
    text = message.split("\n")[0]  # the first failed assertion's own words
    if (error is not None or re.search(r"ModuleNotFoundError|ImportError|AttributeError: module", text)
            or re.search(r"argument command: invalid choice: ", message)):  # argparse: no such subcommand
        return "not runnable"
    if re.match(r"""AssertionError: (['"]).*\1 not in (['"])quantkit: error""", text):
        return "clean"  # one clean line, in other words than the case expects
    if "data loss" in text:
        return "data loss"
    if ("got traceback" in text or "exit None" in text or text.startswith("assert (None ==")
            or re.match(r"(?!AssertionError|Failed|ExceptionGroup)\w+(Error|Exception): ", text)):
        return "traceback"  # an exception escaped main (exit None), or the case's own call raised
    if "got ok" in text:
        return "silent"
    if "left behind" in text:
        return "left files"
    if "got other" in text:
        return "other exit"
    return "silent"  # a wrong result: the case's own assertion on what came out


def _shadow_tree(tree: Path) -> Path:
    """A folder to put first on PYTHONPATH so that ``import quantkit`` finds ``tree``'s sources (with kernels/,
    eval/ and recipes/ linked in as the wheel lays them out)."""
    shadow = Path(tempfile.mkdtemp(prefix="quantkit-census-"))
    pkg = shadow / "quantkit"
    pkg.mkdir()
    for item in (tree / "quantkit").iterdir():
        (pkg / item.name).symlink_to(item)
    for name, src in (("kernels", "kernels"), ("eval", "eval"), ("recipes", "recipes")):
        if (tree / src).is_dir() and not (pkg / name).exists():
            (pkg / name).symlink_to(tree / src)
    return shadow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, default=None, help="a source tree of quantkit (default: the installed one)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--cases", action="store_true", help="also print each case's class and first failure line")
    a = p.parse_args(argv)
    env = dict(os.environ)
    if a.tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(_shadow_tree(a.tree.resolve())), env.get("PYTHONPATH", "")])
    xml = Path(tempfile.mkdtemp()) / "faults.xml"
    # Not from the repository root: ``python -m`` puts the working directory first on sys.path.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "--rootdir",
           str(REPO), "-c", str(REPO / "pyproject.toml"),
           *sorted(str(f) for f in (REPO / "tests").glob("test_faults_*.py"))] + (["-k", a.k] if a.k else [])
    subprocess.run(cmd, env=env, cwd=xml.parent, stdout=subprocess.DEVNULL)
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(xml).getroot().iter("testcase"):
        kind = classify(case)
        by_file[case.get("classname", "?").rsplit(".", 1)[-1]][kind] += 1
        if a.cases:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            why = (node.get("message") or "").splitlines()[0][:150] if node is not None else ""
            print(f"{kind:13s} {case.get('name')}  {why}")
    cols = [*CLASSES, "skipped"]
    print(f"quantkit: {a.tree or 'installed'}")
    print(f"{'file':24s}" + "".join(f"{c:>14s}" for c in cols) + f"{'cases':>8s}")
    total: collections.Counter = collections.Counter()
    for name, counts in sorted(by_file.items()):
        total.update(counts)
        print(f"{name:24s}" + "".join(f"{counts[c]:14d}" for c in cols) + f"{sum(counts.values()):8d}")
    print(f"{'all':24s}" + "".join(f"{total[c]:14d}" for c in cols) + f"{sum(total.values()):8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
