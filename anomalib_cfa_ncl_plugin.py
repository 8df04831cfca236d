"""Lazy import hook that makes FocusDist feel like a built-in anomalib model.

anomalib has no plugin entry point: ``anomalib train --model FocusDist`` and ``get_model("FocusDist")`` only
find classes that are already imported. ``anomalib_cfa_ncl_plugin.pth``, installed into site-packages with
the package, calls :func:`install` at interpreter start. That only adds a finder to ``sys.meta_path`` and
imports nothing heavy (no torch), so interpreters that never use anomalib pay nothing. When a program imports
``anomalib``, the finder imports ``anomalib_cfa_ncl`` right after it, which registers ``FocusDist`` and the
``MVTec`` / ``BTAD`` datamodules; when it imports anomalib's CLI, ordinary mistakes are reported in one line
and ``--seed_everything`` is applied.

Example:
    >>> import anomalib_cfa_ncl_plugin
    >>> anomalib_cfa_ncl_plugin.install()  # what the .pth file does; installing twice is harmless

"""

from __future__ import annotations

import sys

# Imported at every interpreter start: only ``sys`` at run time (``typing`` or ``importlib.abc`` would cost
# milliseconds each); the loader and finder follow the import protocols by duck typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def _load_plugin() -> None:
    """Register FocusDist and the alias datamodules with anomalib."""
    import anomalib_cfa_ncl
    import anomalib_cfa_ncl.data  # noqa: F401


def _install_cli_integration() -> None:
    """Report ordinary mistakes in anomalib's CLI in one line and apply its ``--seed_everything``."""
    from anomalib_cfa_ncl.cli import install_cli_integration

    install_cli_integration()


# Hooks run once, right after the module named by the key has been executed.
HOOKS: dict[str, Callable[[], None]] = {
    "anomalib": _load_plugin,
    "anomalib.cli.cli": _install_cli_integration,
}


class _PostImportLoader:
    """Run the real loader, then a hook; afterwards the module keeps its real loader."""

    def __init__(self, loader: Loader, hook: Callable[[], None]) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        """Create the module as the real loader does."""
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Execute the module, hand it back to its real loader, then run the hook."""
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.hook()
        except Exception as error:  # a broken plugin must not break anomalib itself
            import warnings

            message = f"anomalib_cfa_ncl: the hook after importing {module.__name__!r} failed: {error!r}"
            warnings.warn(message, stacklevel=2)


class AnomalibPluginFinder:
    """Meta path finder that attaches the :data:`HOOKS` to the import of their modules, each once."""

    def __init__(self) -> None:
        self.pending = dict(HOOKS)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        """Find the module with the other finders and wrap its loader when a hook waits for it."""
        hook = self.pending.pop(fullname, None)
        if hook is None:
            return None
        if not self.pending:
            self.uninstall()
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PostImportLoader(spec.loader, hook)
        return spec

    def uninstall(self) -> None:
        """Remove the finder from ``sys.meta_path``."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Add the finder to ``sys.meta_path``; hooks of modules imported already run now."""
    if any(isinstance(finder, AnomalibPluginFinder) for finder in sys.meta_path):
        return
    finder = AnomalibPluginFinder()
    for name in list(finder.pending):
        if name in sys.modules:
            finder.pending.pop(name)()
    if finder.pending:
        sys.meta_path.insert(0, finder)
