"""Builds the optional native parts: the completion bridge (pygpukit.runtime._cbridge) and
the memory book with PyTorch's allocator on it (pygpukit.runtime._native).

Both are plain C with no CUDA headers: they find the driver's functions in the driver
library at run time, so they compile on machines without a GPU. If no C compiler is
available the build goes on without them: pygpukit then uses its pure-Python bridge and a
Python memory book, and PyTorch's allocations are not charged to contexts.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "pygpukit.runtime._cbridge",
            sources=["pygpukit/runtime/_cbridge.c"],
            libraries=["dl"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        )
    )
    ext_modules.append(
        Extension(
            "pygpukit.runtime._native",
            sources=["pygpukit/runtime/_native.c", "pygpukit/runtime/_memory.c"],
            depends=["pygpukit/runtime/_memory.h"],
            libraries=["dl", "pthread"],
            # hidden: only the module's init and PyTorch's two entry points are exported
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
