"""Build script: the pure-Python package plus the optional compiled extension ``fastcollab._C``.

* ``fastcollab._C``: C++ CPU kernels (csrc/*.cpp), built with ninja via torch.utils.cpp_extension.
  The CUDA sources (csrc/cuda/*.cu) are added only when this torch has CUDA (torch.version.cuda) and
  nvcc is found; ``CUDA_HOME`` is set to nvcc's real toolkit root when unset (the ``nvcc`` on a PATH may be
  a wrapper script, from whose location torch would guess the root wrong).
* ``FASTCOLLAB_NO_EXT=1`` skips the extension. Otherwise a failed compile installs the package without it
  (a loud warning; fastcollab then uses its other backends and says why at import) -- unless
  ``FASTCOLLAB_REQUIRE_EXT=1`` (CI, bench/gpu_check.sh): then any failure to build ``_C`` -- and, with a CUDA
  torch, to build its CUDA kernels -- fails the install with a non-zero exit.
* ``fastcollab.kernels`` (Triton) is the top-level ``kernels/`` directory.
"""
import glob
import importlib.util
import os
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("FASTCOLLAB_REQUIRE_EXT", "0") not in ("", "0")


def _toolkit():
    """fastcollab/_cuda_toolkit.py, loaded by path (the package is not importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("_fc_cuda_toolkit", os.path.join(HERE, "fastcollab", "_cuda_toolkit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _no_ext(why: str):
    """Install without _C (a warning), or stop the install when FASTCOLLAB_REQUIRE_EXT=1."""
    if REQUIRE_EXT:
        sys.exit(f"fastcollab: FASTCOLLAB_REQUIRE_EXT=1 and {why}")
    warnings.warn(f"fastcollab: {why}; installing WITHOUT fastcollab._C (the ops fall back to the Triton/reference "
                  "backends; `python -m fastcollab._ext` says which backends a process has and why one is missing)")


def _ext_modules_and_cmdclass():
    if os.environ.get("FASTCOLLAB_NO_EXT", "0") not in ("", "0"):
        print("fastcollab: FASTCOLLAB_NO_EXT set, skipping the compiled extension", file=sys.stderr)
        return [], {}
    tk = _toolkit()
    nvcc_bin = tk.find_nvcc()
    if nvcc_bin is not None and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = tk.cuda_home(nvcc_bin)   # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch missing at build time: pure-Python install
        _no_ext(f"torch is not importable at build time ({e})")
        return [], {}

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
    use_cuda = bool(torch.version.cuda) and nvcc_bin is not None and bool(cu)
    if torch.version.cuda and not use_cuda and REQUIRE_EXT:
        sys.exit(f"fastcollab: FASTCOLLAB_REQUIRE_EXT=1, torch has CUDA {torch.version.cuda} but nvcc was not found "
                 "(PATH or $CUDA_HOME/bin): install the CUDA toolkit so the CUDA kernels are built")
    if use_cuda:
        ext = ce.CUDAExtension(
            "fastcollab._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DFASTCOLLAB_WITH_CUDA"], "nvcc": ["-O3", "--fmad=false"]},
        )
    else:
        ext = ce.CppExtension("fastcollab._C", cpp, extra_compile_args={"cxx": cxx})

    class BuildExt(ce.BuildExtension):
        """Like BuildExtension, but a failed compile warns and installs the package without _C
        (or fails the install, FASTCOLLAB_REQUIRE_EXT=1)."""

        failed = False

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - toolchain checks, or copying the _C that failed to build
                if not self.failed:
                    _no_ext(f"building fastcollab._C failed ({type(e).__name__}: {e})")

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                self.failed = True
                _no_ext(f"building {ext_.name} failed ({type(e).__name__}: {e})")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules_and_cmdclass()

packages = find_packages(include=["fastcollab", "fastcollab.*"])
package_dir = {}
if os.path.isdir(os.path.join(HERE, "kernels")):
    packages.append("fastcollab.kernels")
    package_dir["fastcollab.kernels"] = "kernels"

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
