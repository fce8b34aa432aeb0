"""Packaging: the Python package, the Triton kernels as `sppo_fast.kernels`, and the native CPU
extension `sppo_fast._C` built from csrc/ with ninja. A failed native build never fails the install:
the extension is then missing and `sppo_fast.backend_info()` says why the reference serves the CPU."""

import glob
import os
import sys

from setuptools import setup

PACKAGES = ["sppo_fast", "sppo_fast.backends", "sppo_fast.kernels", "sppo_fast.trainer",
            "sppo_fast.trainer.tasks"]
PACKAGE_DIR = {"sppo_fast.kernels": "kernels"}


def native_extension():
    """The C++ kernels, or ([], {}) with a message when torch or a compiler is missing."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("SPPO_FAST_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(f"sppo-fast: skipping the native CPU kernels ({exc})", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a missing compiler must not fail the install
                print(f"sppo-fast: the native CPU kernels were not built ({exc}); "
                      "the reference backend will serve CPU tensors", file=sys.stderr)

    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    ext = CppExtension("sppo_fast._C", sources, extra_compile_args={"cxx": flags},
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
