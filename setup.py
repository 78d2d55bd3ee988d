"""Build csext: the C++ CPU extension always, the CUDA sources where CUDA torch and a toolkit are.

Environment switches:
  CSEXT_NO_EXTENSION=1   install pure Python (the torch backend only)
  FORCE_CUDA=1           build the CUDA sources even where no GPU or CUDA torch is seen
  FORCE_ONLY_CPU=1       never build the CUDA sources
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS               parallel compile jobs (read by torch's BuildExtension)
  CSEXT_DEBUG=1          -O0 -g
Install with `pip install --no-build-isolation .` so that the build uses the torch installed
(pyproject.toml does not list torch among the build requirements). The build writes
csext/_build.json beside the extension: the torch version it was built against, which
csext/backends/aten.py checks before it loads csext._C.
"""

import glob
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("CSEXT_NO_EXTENSION"):
        return [], {}
    try:
        import torch
    except ImportError:
        # pip's default build isolation builds in a fresh environment, without the torch installed
        sys.exit("csext: csext._C must be built against the torch that will run it, which pip's build "
                 "isolation hides: type `pip install --no-build-isolation .` (after installing torch)")
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildWithRecord(BuildExtension):
        def run(self):
            super().run()
            # The torch this build is for, beside the extension wherever it went: the build folder
            # (wheels) and, for in-place and editable builds, the source tree too.
            folders = [os.path.join(self.build_lib, "csext")] + ([os.path.join(ROOT, "csext")] if self.inplace else [])
            for folder in folders:
                with open(os.path.join(folder, "_build.json"), "w") as f:
                    json.dump({"torch": str(torch.__version__)}, f)
                    f.write("\n")

    opt = ["-O0", "-g"] if _flag("CSEXT_DEBUG") else ["-O3"]
    # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. torch ships
    # libgomp.so.1 under that SONAME, so the extension shares torch's OpenMP runtime.
    openmp = sys.platform.startswith("linux")
    cxx = opt + ["-fvisibility=hidden"] + (["-fopenmp"] if openmp else [])
    link = ["-fopenmp"] if openmp else []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The CUDA kernels (csrc/cuda/*.cu, free of torch) and their registration (csrc/cuda/*.cpp).
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

    want_cuda = not _flag("FORCE_ONLY_CPU") and (
        _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    if want_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "csext._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("CSEXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "csext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildWithRecord}


ext_modules, cmdclass = _extensions()

setup(
    packages=["csext", "csext.backends", "csext.experiments", "csext.kernels"],
    package_dir={"csext": "csext", "csext.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
