"""Everything about the package is in pyproject.toml; this file only adds ``quantkit-autoload.pth`` to the installed
files, in wheels and in editable installs, so that any Python process with quantkit installed can load a quantkit
checkpoint through plain transformers (see _quantkit_autoload.py)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "quantkit-autoload.pth"
LINE = "import _quantkit_autoload\n"  # site runs a .pth line that starts with "import"


class BuildPy(build_py):
    """A wheel's root is site-packages: write the .pth beside the packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            Path(self.build_lib, PTH).write_text(LINE)

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [str(Path(self.build_lib, PTH))]
        return super().get_outputs(include_bytecode) + extra


class EditableWheel(editable_wheel):
    """An editable wheel holds links, not build_py's output: write the .pth into the wheel's root too (next to
    setuptools' own ``__editable__`` .pth, which sorts first, so its finder is in place when ours imports)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH).write_text(LINE)


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
