"""Build hook: put ``anomalib_cfa_ncl_plugin.pth`` into site-packages, for regular and editable installs.

The metadata lives in ``setup.cfg``. The ``.pth`` file installs the lazy import hook that lets anomalib's CLI
resolve ``--model FocusDist`` without the user importing anything (anomalib has no plugin entry point).
``data_files`` cannot do this: they land below ``sys.prefix``, not in site-packages. A wheel installs what
``build_lib`` holds into site-packages; an editable wheel does the same with the ``install`` command's
``install_lib``, where setuptools writes the files that are not linked to the source tree.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH_FILE = Path(__file__).parent / "anomalib_cfa_ncl_plugin.pth"


class BuildPth(Command):
    """Copy the plugin's ``.pth`` file to the root of the wheel."""

    description = "copy anomalib_cfa_ncl_plugin.pth next to the packages"
    user_options: list = []  # noqa: RUF012  # distutils' interface

    def initialize_options(self) -> None:
        """Set defaults; ``editable_wheel`` switches ``editable_mode`` on."""
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        """Take ``build_lib`` from the ``build`` command."""
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> Path:
        if self.editable_mode:
            return Path(self.get_finalized_command("install").install_lib) / PTH_FILE.name
        return Path(self.build_lib) / PTH_FILE.name

    def run(self) -> None:
        """Copy the file."""
        self.copy_file(str(PTH_FILE), str(self._target()))

    def get_outputs(self) -> list[str]:
        """Return the copied file."""
        return [str(self._target())]

    def get_output_mapping(self) -> dict[str, str]:
        """Return the copied file and its source."""
        return {str(self._target()): str(PTH_FILE)}


class BuildWithPth(build):
    """``build`` that also runs :class:`BuildPth`."""

    sub_commands = [*build.sub_commands, ("build_pth", None)]  # noqa: RUF012  # distutils' interface


setup(cmdclass={"build": BuildWithPth, "build_pth": BuildPth})
