"""Where the CUDA toolkit is and how to compile ``csrc/cuda/*.cu`` with it (stdlib only).

Used by setup.py (loaded by file path, before the package exists), tests/test_cuda_compile.py and
bench/gpu_check.sh. Three facts it handles:

* the ``nvcc`` on the PATH may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), so the
  toolkit root torch guesses from its location (``/usr/local``) is wrong: :func:`cuda_home` asks nvcc itself
  (``nvcc -dryrun`` prints its real ``_HERE_`` directory);
* the C++ standard must be the one torch builds extensions with (:func:`torch_cxx_std`);
* a CPU wheel of torch ships the ``c10/cuda`` headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``
  (it only defines ``C10_CUDA_BUILD_SHARED_LIBS``): :func:`header_shim` writes it into a scratch directory
  when torch lacks it, so a compile-only check works without a CUDA torch.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

MACROS_HEADER = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` when CUDA_HOME is set and has one, else ``nvcc`` on the PATH, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> str:
    """The toolkit root of ``nvcc``, following wrapper scripts: nvcc's own ``-dryrun`` says where it lives."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stderr + out.stdout, re.MULTILINE)
        if m and os.path.isdir(m.group(1).strip()):
            return os.path.dirname(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def torch_cxx_std() -> str:
    """The ``-std=`` torch.utils.cpp_extension passes to the compilers (newest one it names; c++17 if none)."""
    import inspect

    from torch.utils import cpp_extension

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension))
    return f"c++{max(int(v) for v in found)}" if found else "c++17"


def header_shim(scratch: str) -> list[str]:
    """Include dirs to add so torch's c10/cuda headers compile: ``[scratch]`` holding the generated macros
    header when this torch lacks it (CPU wheel), else ``[]``."""
    from torch.utils import cpp_extension

    if any(os.path.exists(os.path.join(d, MACROS_HEADER)) for d in cpp_extension.include_paths()):
        return []
    path = os.path.join(scratch, MACROS_HEADER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [scratch]


def compile_command(nvcc: str, src: str, obj: str, scratch: str, arch: str = "sm_90") -> list[str]:
    """``nvcc -c`` of one .cu with the flags setup.py's CUDAExtension uses (torch's nvcc flags, ``--fmad=false``)."""
    import torch
    from torch.utils import cpp_extension

    incs = header_shim(scratch) + cpp_extension.include_paths()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return ([nvcc, "-c", src, "-o", obj, f"-arch={arch}", f"-std={torch_cxx_std()}", "-O3", "--fmad=false",
             "-DFASTCOLLAB_WITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
             "-Xcompiler", "-fPIC"]
            + list(cpp_extension.COMMON_NVCC_FLAGS) + [f"-I{d}" for d in incs])
