"""Build of flatkern's optional C++ extension (``flatkern._C``).

The extension compiles against the torch that is installed, so install with
``pip install --no-build-isolation .``: an isolated build would compile
against a different torch and fail or crash at import.

Environment flags:
    FLATKERN_SKIP_CPP_BUILD=1   build no extension (flatkern then runs on plain torch)
    FLATKERN_FORCE_CPP_BUILD=1  fail the install if the extension cannot be built
"""

import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


if not _flag("FLATKERN_SKIP_CPP_BUILD"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # torch absent at build time: plain-torch package
        if _flag("FLATKERN_FORCE_CPP_BUILD"):
            raise
        print(f"flatkern: torch not importable at build time ({exc}); building without the C++ extension.\n"
              "          Install torch first and use `pip install --no-build-isolation .`", file=sys.stderr)
    else:
        sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
        ext_modules.append(
            CppExtension(
                "flatkern._C",
                sources,
                # OpenMP makes at::parallel_for run in parallel over batch problems
                extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        )

        class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
            """A failed compile (no compiler, bad toolchain) leaves a plain-torch package, unless forced."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any build failure
                    if _flag("FLATKERN_FORCE_CPP_BUILD"):
                        raise
                    print(f"flatkern: the C++ extension did not build ({exc}); installing the plain-torch "
                          "package (set FLATKERN_FORCE_CPP_BUILD=1 to make this an error)", file=sys.stderr)

        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
