"""The seed's ``import _pygpukit_rust as rust``: an alias of :mod:`pygpukit.lowlevel`.

The seed describes a Rust extension module under this name; pygpukit's low-level objects are
Python, in :mod:`pygpukit.lowlevel`, and this module re-exports them so the seed's snippets
run as written. New code should import :mod:`pygpukit.lowlevel`.
"""

from pygpukit.lowlevel import *  # noqa: F403 - the alias re-exports the whole namespace
from pygpukit.lowlevel import __all__ as __all__
