"""Packaging: the Python package (the Triton kernels included, as sppo_fast/kernels/), and the native
CPU extension `sppo_fast._C` built from csrc/ with ninja. A failed native build never fails the install:
the extension is then missing and `sppo_fast.backend_info()` says why the reference serves the CPU."""

import glob
import os
import sys

from setuptools import find_packages, setup

# every package under sppo_fast/, sppo_fast.kernels (the Triton kernels) included: nothing top-level,
# so no checkout directory can shadow an installed package (Hugging Face's `kernels`, for one)
PACKAGES = find_packages(include=["sppo_fast", "sppo_fast.*"])


# One build of csrc/ per x86 ISA, as ATen does for its own CPU kernels: the same source compiled with
# each CPU_CAPABILITY (which selects at::vec::Vectorized's width) and its -m flags, as separate modules,
# so that no AVX-512 code can reach a CPU without it. sppo_fast/backends/native.py imports the best
# module that torch.backends.cpu.get_cpu_capability() allows; sppo_fast._C (DEFAULT) runs anywhere.
NATIVE_ISA_BUILDS = {
    "sppo_fast._C": ("DEFAULT", []),
    "sppo_fast._C_avx2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "sppo_fast._C_avx512": ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                       "-mfma", "-mf16c"]),
}


def native_extension():
    """The C++ kernels, or ([], {}) with a message when torch or a compiler is missing."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("SPPO_FAST_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # an isolated build has no torch: install with --no-build-isolation
        print(f"sppo-fast: skipping the native CPU kernels ({exc}); install torch first and use "
              "`pip install --no-build-isolation -e .` to build them", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a missing compiler must not fail the install
                print(f"sppo-fast: the native CPU kernels {ext.name} were not built ({exc}); "
                      "the reference backend will serve CPU tensors unless another ISA build did",
                      file=sys.stderr)

    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]  # -g0: no 8 MB of debug info
    exts = []
    only = os.environ.get("SPPO_FAST_ISA_BUILDS")  # e.g. "AVX512" to iterate on one build quickly
    for name, (capability, isa_flags) in NATIVE_ISA_BUILDS.items():
        if (isa_flags and not x86) or (only and capability not in only.upper().split(",")):
            continue
        defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        exts.append(CppExtension(name, sources, extra_compile_args={"cxx": flags + isa_flags + defines},
                                 extra_link_args=["-fopenmp"]))
    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
