"""Build of flatkern's optional C++ extension (``flatkern._C``).

The extension compiles against the torch that is installed, so install with
``pip install --no-build-isolation .``: an isolated build would compile
against a different torch and fail or crash at import.

Compiling takes one to two minutes. The build says so on stderr (and, since pip
hides a build's output unless run with ``-v``, on the terminal when there is
one); ``pip install -v --no-build-isolation .`` shows the compiler's progress.

Sources: every ``csrc/ops/**/*.cpp`` (csrc/ops/hessian_trace.cpp is the module
entry; the op schemas are defined in Python, flatkern/kernels/op.py). Flags per
compiler: ``-O3``; OpenMP (``-fopenmp``, MSVC ``/openmp``) only where a test
program compiles and links with it, else ``-fopenmp-simd`` where that compiles
(then a batch of problems runs on one thread); never a global ``-mavx2``: the
AVX2 kernels carry per-function target attributes behind an x86 guard and are
chosen at run time.

Environment flags:
    FLATKERN_SKIP_CPP_BUILD=1   build no extension (flatkern then runs on plain torch)
    FLATKERN_FORCE_CPP_BUILD=1  fail the install if the extension cannot be built
"""

import glob
import os
import sys
import tempfile

from setuptools import setup

ext_modules, cmdclass = [], {}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _say(message):
    """One line on stderr, and on the terminal when pip has captured stderr."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, Windows): stderr was all there is
        pass


_OPENMP_TEST = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
_SIMD_TEST = "int main() {\n  double s = 0;\n#pragma omp simd reduction(+ : s)\n  for (int i = 0; i < 8; ++i) s += i;\n  return s > 0 ? 0 : 1;\n}\n"


def _try_build(compiler, source, compile_args, link_args):
    """Whether ``source`` compiles (and links) with these flags: the try-compile behind the OpenMP choice."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flatkern_flag_test.cpp")
        with open(path, "w") as f:
            f.write(source)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=compile_args)
            compiler.link_executable(objects, os.path.join(tmp, "flatkern_flag_test"), extra_postargs=link_args)
        except Exception:  # noqa: BLE001 - any compiler or linker failure means "no"
            return False
    return True


def _platform_flags(compiler):
    """(compile args, link args, what OpenMP support was found) for this compiler."""
    if compiler.compiler_type == "msvc":
        base = ["/O2"]
        if _try_build(compiler, _OPENMP_TEST, ["/openmp"], []):
            return base + ["/openmp"], [], "OpenMP"
        return base, [], "no OpenMP"
    base = ["-O3"]
    if _try_build(compiler, _OPENMP_TEST, ["-fopenmp"], ["-fopenmp"]):
        # OpenMP makes at::parallel_for run in parallel over batch problems
        return base + ["-fopenmp"], ["-fopenmp"], "OpenMP"
    if _try_build(compiler, _SIMD_TEST, ["-fopenmp-simd"], []):
        return base + ["-fopenmp-simd"], [], "no OpenMP (a batch runs on one thread; simd reductions kept)"
    return base, [], "no OpenMP (a batch runs on one thread)"


if not _flag("FLATKERN_SKIP_CPP_BUILD"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # torch absent at build time: plain-torch package
        if _flag("FLATKERN_FORCE_CPP_BUILD"):
            raise
        print(f"flatkern: torch not importable at build time ({exc}); building without the C++ extension.\n"
              "          Install torch first and use `pip install --no-build-isolation .`", file=sys.stderr)
    else:
        sources = sorted(glob.glob(os.path.join("csrc", "ops", "**", "*.cpp"), recursive=True))
        ext_modules.append(CppExtension("flatkern._C", sources))

        class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
            """Flags for this compiler; a failed compile leaves a plain-torch package, unless forced."""

            def build_extensions(self):
                compile_args, link_args, openmp = _platform_flags(self.compiler)
                for ext in self.extensions:
                    ext.extra_compile_args = {"cxx": compile_args}
                    ext.extra_link_args = link_args
                _say(f"flatkern: compiling the C++ extension flatkern._C ({len(sources)} sources, {openmp}); "
                     "this takes 1-2 minutes (`pip install -v` shows the compiler)")
                super().build_extensions()
                _say("flatkern: the C++ extension flatkern._C is built")

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any build failure
                    if _flag("FLATKERN_FORCE_CPP_BUILD"):
                        raise
                    _say(f"flatkern: the C++ extension did not build ({exc}); installing the plain-torch "
                         "package (set FLATKERN_FORCE_CPP_BUILD=1 to make this an error)")

        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
