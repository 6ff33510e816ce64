"""Builds the C kernels into qconvert._kernels. Floating point is kept honest: -O3 with
-ffp-contract=off and no -ffast-math, because the bytes must equal ggml's."""
import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "qconvert._kernels",
            sources=sorted(glob.glob("kernels/*.c")),
            depends=sorted(glob.glob("kernels/*.h")),
            include_dirs=["kernels"],
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra", "-Wno-psabi",
                                "-D_GNU_SOURCE"],
            extra_link_args=["-lpthread"],
        )
    ]
)
