"""Build script: the pure-Python package plus the optional compiled extension ``fastcollab._C``.

* ``fastcollab._C``: C++ CPU kernels (csrc/*.cpp), built with ninja via torch.utils.cpp_extension.
  The CUDA sources (csrc/cuda/*.cu) are added only when this torch has CUDA (torch.version.cuda) and
  nvcc is found.
* ``FASTCOLLAB_NO_EXT=1`` skips the extension; if its compile fails the package installs without it
  (a warning is printed) and fastcollab falls back to the other backends at run time.
* ``fastcollab.kernels`` (Triton) is the top-level ``kernels/`` directory.
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules_and_cmdclass():
    if os.environ.get("FASTCOLLAB_NO_EXT", "0") not in ("", "0"):
        print("fastcollab: FASTCOLLAB_NO_EXT set, skipping the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch missing at build time: pure-Python install
        warnings.warn(f"fastcollab: torch is not importable at build time ({e}); installing without fastcollab._C")
        return [], {}

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
    nvcc_bin = shutil.which("nvcc") or (
        os.path.join(ce.CUDA_HOME, "bin", "nvcc") if getattr(ce, "CUDA_HOME", None) else None
    )
    use_cuda = bool(torch.version.cuda) and nvcc_bin is not None and os.path.exists(nvcc_bin) and bool(cu)
    if use_cuda:
        ext = ce.CUDAExtension(
            "fastcollab._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DFASTCOLLAB_WITH_CUDA"], "nvcc": ["-O3", "--fmad=false"]},
        )
    else:
        ext = ce.CppExtension("fastcollab._C", cpp, extra_compile_args={"cxx": cxx})

    class BuildExt(ce.BuildExtension):
        """Like BuildExtension, but a failed compile warns and installs the package without _C."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                warnings.warn(f"fastcollab: building fastcollab._C failed ({e}); installing without it")

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"fastcollab: building {ext_.name} failed ({e}); installing without it")

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
