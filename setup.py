"""The optional native score kernels; everything else about the build is in pyproject.toml.

Without a C compiler (or on a compiler the kernels do not support) the build skips them and
the scores stay eager: ``oodmon/_native.py`` falls back on its own.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "oodmon._native_scores",
            ["oodmon/_native_scores.c"],
            optional=True,
            extra_compile_args=["-O3", "-Wno-psabi"],
        )
    ]
)
