"""Build of fedeq's optional C extension; everything else is declared in pyproject.toml.

``fedeq._fused`` holds the fused CPU steps of the solvers. It is optional: where it cannot be compiled
the solvers run their PyTorch code, with the same results.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=gnu11", "-fopenmp-simd", "-Wall"]

setup(
    ext_modules=[
        Extension(
            "fedeq._fused",
            sources=["fedeq/_fused.c"],
            depends=["fedeq/_fused_impl.h"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
