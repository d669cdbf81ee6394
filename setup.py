"""Build of diffkern's compiled ops (diffkern._C).

The CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit and a CUDA build
of torch are both present, whether or not a GPU is visible (so GPU-less CI machines compile them).

Environment variables:
  DIFFKERN_CUDA=auto|1|0   auto (default) builds CUDA when possible; 1 requires it; 0 skips it.
  CUDA_HOME                the toolkit; by default the first of $CUDA_HOME, $CUDA_PATH,
                           /usr/local/cuda, the nvcc on PATH, /usr/local/cuda-* that has
                           include/cuda_runtime.h (an nvcc wrapper in /usr/local/bin misleads torch).
  TORCH_CUDA_ARCH_LIST     GPU architectures; defaults to the visible GPUs, or to
                           DEFAULT_ARCH_LIST below when no GPU is visible.
  MAX_JOBS                 parallel compile jobs (ninja).
  CXX, CC                  the host compilers; one that finds no libstdc++.so (it would link a
                           private static copy that crashes beside torch's) is replaced by the
                           first g++ on PATH that does, or the build stops and says why.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_cuda_home(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")):
            return path
    return None


def cuda_mode():
    value = os.environ.get("DIFFKERN_CUDA", "auto").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("", "auto"):
        return "auto"
    sys.exit(f"diffkern setup: DIFFKERN_CUDA must be auto, 1 or 0, not {value!r}")


def say(message):
    """A line for the person installing: pip hides a build's output unless run with -v, so while it
    captures ours the line also goes to the terminal itself (when there is one)."""
    print(f"diffkern setup: {message}", flush=True)
    if sys.stdout.isatty():
        return
    # pip runs this file twice (metadata, then the build): say each line to the terminal once
    marker = os.path.join(ROOT, "build", ".diffkern-setup-said")
    try:
        import time

        with open(marker) as f:
            if message in f.read() and time.time() - os.path.getmtime(marker) < 600:
                return
    except OSError:
        pass
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"diffkern setup: {message}\n")
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "a") as f:
            f.write(message + "\n")
    except OSError:
        pass  # no terminal (CI, a container): the verbose log has the line


MODE = cuda_mode()
CUDA_HOME = find_cuda_home() if MODE != "off" else None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

TORCH_HAS_CUDA = torch.version.cuda is not None
if MODE == "on" and not (CUDA_HOME and TORCH_HAS_CUDA):
    sys.exit(
        "diffkern setup: DIFFKERN_CUDA=1 but "
        + ("no CUDA toolkit was found (set CUDA_HOME)" if not CUDA_HOME else
           f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    )
WITH_CUDA = MODE != "off" and bool(CUDA_HOME) and TORCH_HAS_CUDA

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # Without a GPU and without an arch list torch's build fails (IndexError in its arch parsing).
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        say(f"no GPU visible, so the CUDA kernels are built for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")

if WITH_CUDA:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs'"
    count = len([a for a in archs.replace(" ", ";").split(";") if a]) if os.environ.get("TORCH_CUDA_ARCH_LIST") else 1
    say(f"torch {torch.__version__}; building the CPU kernels and the CUDA kernels (CUDA_HOME={CUDA_HOME}) for "
        f"architectures {archs}: on 2 cores about 40 s plus about a minute per architecture ({count} here). "
        "DIFFKERN_CUDA=0 builds the CPU kernels alone; TORCH_CUDA_ARCH_LIST=9.0 builds for one architecture")
else:
    reason = {"off": "DIFFKERN_CUDA=0", "auto": "no CUDA toolkit" if not CUDA_HOME else
              f"torch {torch.__version__} is a CPU-only build"}.get(MODE, MODE)
    say(f"torch {torch.__version__}; building the CPU kernels only ({reason}): on 2 cores about 40 s")


def _links_shared_libstdcxx(compiler):
    """Whether `compiler` finds libstdc++.so. A toolchain that has only libstdc++.a (seen: a gcc
    under /opt/gcc on the lent GPU machine) links a private copy of the C++ library into the
    extension; torch's copy and ours then share std::locale state, and the first error message an op
    formats (an ostream insert) segfaults."""
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True  # not a gcc-like driver: nothing to say about it
    return os.path.isabs(found) and os.path.exists(found)


def choose_cxx():
    """Keep the C++ compiler torch would use unless it can only link libstdc++ statically; then take
    the first other g++ that links it as a shared library (and its gcc), or stop with the reason."""
    if not sys.platform.startswith("linux"):
        return
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None or _links_shared_libstdcxx(compiler):
        return
    candidates = [p for d in os.environ.get("PATH", "").split(os.pathsep) for p in [os.path.join(d, "g++")]
                  if os.access(p, os.X_OK)] + ["/usr/bin/g++"]
    for candidate in candidates:
        if os.path.realpath(candidate) != os.path.realpath(compiler) and _links_shared_libstdcxx(candidate):
            os.environ["CXX"] = candidate
            gcc = os.path.join(os.path.dirname(candidate), "gcc")
            if os.access(gcc, os.X_OK):
                os.environ["CC"] = gcc
            print(f"diffkern setup: {compiler} finds no libstdc++.so (it would link a private static copy, "
                  f"which crashes beside torch's); using CXX={candidate}")
            return
    sys.exit(f"diffkern setup: {compiler} finds no libstdc++.so, so the extension would carry a static copy of "
             "the C++ library that crashes beside torch's; set CXX (and CC) to a compiler that links it as a "
             "shared library")


choose_cxx()


def write_build_config():
    """Record what the extension is built against; diffkern checks it before loading the library."""
    path = os.path.join(ROOT, "diffkern", "_build_config.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if WITH_CUDA else ''!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def extension():
    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "python_module.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    # Every formula is compiled exactly as written (explicit fma only): the CPU, AVX2 and CUDA
    # paths then agree bitwise. See csrc/include/diffkern/normal.h.
    cxx = ["-O3", "-ffp-contract=off"]
    link = []
    # at::parallel_for is inlined into our code: with torch's OpenMP backend it runs on one thread
    # unless we compile with OpenMP too. The loader then shares torch's own libgomp.so.1.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("DIFFKERN_SANITIZE", "").strip() not in ("", "0"):
        # AddressSanitizer + UndefinedBehaviorSanitizer on the CPU kernels (tools/sanitize.sh: load
        # libasan first with LD_PRELOAD). Every UB report is fatal, so a test run fails on it.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                    "-g"]
        cxx += sanitize
        link += sanitize
        print("diffkern setup: sanitizers ON (address, undefined)")
    include_dirs = [os.path.join(ROOT, csrc, "include")]
    if not WITH_CUDA:
        return CppExtension("diffkern._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    nvcc = ["-O3", "--fmad=false", "-DDK_WITH_CUDA", "-Xcompiler", "-ffp-contract=off"]
    return CUDAExtension("diffkern._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ["-DDK_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link)


write_build_config()
setup(
    # namespace discovery: the data folders (diffkern/datasets, datasets/models) are packages too, or
    # setuptools warns that it will stop shipping their files
    packages=find_namespace_packages(include=["diffkern", "diffkern.*"], exclude=["*.__pycache__"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
