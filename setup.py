"""Build of flatkern's optional C++ extension (``flatkern._C``).

The extension compiles against the torch that is installed, so install with
``pip install --no-build-isolation .``: an isolated build would compile
against a different torch and fail or crash at import.

What the build says: pip hides a build's output unless run with ``-v``, so
every line below goes to stderr, to the terminal when there is one
(``/dev/tty``), and to the log ``build/flatkern-build.log`` (its path is the
first line), which also keeps every compiler command and diagnostic:

    flatkern: building the C++ extension flatkern._C (log: <root>/build/flatkern-build.log)
    flatkern: compiling 5 C++ sources (OpenMP; in parallel; ...): csrc/ops/autograd/hessian_trace.cpp, ...
    flatkern: [1/5] compiled csrc/ops/autograd/hessian_trace.cpp (35 s)     as each object is done
    ...
    flatkern: the C++ extension flatkern._C is built (1 min 58 s)

An extension that is up to date is not compiled again: after a build,
``build/flatkern-build-stamp.json`` records a fingerprint of its inputs (every
file under ``csrc/``, this file, the compile and link flags, the compiler, the
Python ABI and the torch version) and the SHA-256 of the built
``flatkern/_C*.so``.  When a later install (the README's test command after its
main command) finds that same ``.so`` in ``flatkern/`` with a matching
fingerprint, it keeps it and says so instead of compiling (delete the stamp to
force a rebuild).  A rebuilt ``.so`` replaces the old one by a rename, so a
process that has the old one loaded keeps running.

Sources: every ``csrc/ops/**/*.cpp`` (csrc/ops/hessian_trace.cpp is the module
entry; the op schemas are defined in Python, under flatkern/kernels/). Flags per
compiler: ``-O3``; OpenMP (``-fopenmp``, MSVC ``/openmp``) only where a test
program compiles and links with it, else ``-fopenmp-simd`` where that compiles
(then a batch of problems runs on one thread); never a global ``-mavx2``: the
AVX2 kernels carry per-function target attributes behind an x86 guard and are
chosen at run time.  Compiling the five sources takes about 2 minutes of one
core (``MAX_JOBS`` caps the parallel compiler processes; a loaded machine takes
longer).

Environment flags:
    FLATKERN_SKIP_CPP_BUILD=1   build no extension (flatkern then runs on plain torch)
    FLATKERN_FORCE_CPP_BUILD=1  fail the install if the extension cannot be built
    MAX_JOBS=N                  at most N compiler processes at once (torch's convention)
"""

import glob
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG_PATH = os.path.join(ROOT, "build", "flatkern-build.log")
STAMP_PATH = os.path.join(ROOT, "build", "flatkern-build-stamp.json")

ext_modules, cmdclass = [], {}
_log = None  # the build log, open while the extension builds


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _to_log(line):
    if _log is not None:
        _log.write(line + "\n")
        _log.flush()


def _say(message):
    """One line on stderr, in the build log, and on the terminal when pip has captured stderr."""
    print(message, file=sys.stderr, flush=True)
    _to_log(message)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, Windows): stderr and the log were all there is
        pass


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _minutes(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


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


# ------------------------------------------------------------------ compiling, one line per object

_NINJA_STATUS = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


def _compiled_source(command):
    """The source of a compile command (the argument after the last ``-c``), relative to the project; None if none."""
    try:
        args = shlex.split(command)
    except ValueError:
        return None
    # torch's rule is `$cxx -MMD -MF $out.d $cflags -c $in -o $out`, and $cflags holds a -c of its own
    flags = [i for i, a in enumerate(args[:-1]) if a == "-c"]
    if not flags:
        return None
    source = args[flags[-1] + 1]
    return os.path.relpath(source, ROOT) if os.path.isabs(source) else source


def _run_ninja_with_progress(build_directory, verbose, error_prefix):
    """torch's ``cpp_extension._run_ninja_build`` with the same ninja run, said object by object.

    torch sends ninja's output to file descriptor 1, which pip captures; here it
    is read as it comes: every line goes to the log, each finished object is
    said as ``[k/n] compiled <source>`` (ninja prints a status line when an edge
    ends, its command in full with ``-v``), or ``[k/n] FAILED to compile
    <source>`` when ninja's ``FAILED:`` line follows it, and anything else (the
    compiler's diagnostics) goes to stderr too.  (POSIX only: ``select`` on a pipe.)
    """
    command = ["ninja", "-v"]
    if os.environ.get("MAX_JOBS"):  # torch's convention for the number of compiler processes
        command += ["-j", os.environ["MAX_JOBS"]]
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    _to_log(f"$ {' '.join(command)}    (in {build_directory})")
    start, tail, pending, buffer = time.monotonic(), [], None, b""
    sys.stdout.flush()
    proc = subprocess.Popen(command, cwd=build_directory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0)

    def say(failed):
        k, n, source, seconds = pending
        _say(f"flatkern: [{k}/{n}] {'FAILED to compile' if failed else 'compiled'} {source} ({_minutes(seconds)})")

    while True:
        # ninja writes FAILED: right after a failed edge's status line, so a status line is said once the
        # next line shows which it was, or after half a second of quiet (it compiled)
        ready = select.select([proc.stdout], [], [], 0.5 if pending else None)[0]
        if not ready:
            say(failed=False)
            pending = None
            continue
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode(errors="replace")
            tail = (tail + [line])[-60:]
            _to_log(line)
            if pending:
                say(failed=line.startswith("FAILED:"))
                pending = None
            status = _NINJA_STATUS.match(line)
            source = _compiled_source(status.group(3)) if status else None
            if source is not None:
                pending = (status.group(1), status.group(2), source, time.monotonic() - start)
            elif status is None:
                print(line, file=sys.stderr, flush=True)
    if buffer:  # a last line without a newline
        _to_log(buffer.decode(errors="replace"))
        print(buffer.decode(errors="replace"), file=sys.stderr, flush=True)
    if proc.wait() != 0:
        if pending:
            say(failed=True)
        raise RuntimeError(f"{error_prefix}: ninja exited with status {proc.returncode} (full output in "
                           f"{LOG_PATH}):\n" + "\n".join(tail))
    if pending:
        say(failed=False)


if not _flag("FLATKERN_SKIP_CPP_BUILD"):
    try:
        import torch.utils.cpp_extension as cpp_extension
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
            """Flags for this compiler, progress per object, no recompiling of an up-to-date
            extension; a failed compile leaves a plain-torch package, unless forced."""

            _reused = ()  # names of the extensions kept from an earlier build

            def _inplace_path(self, ext):
                """Where the extension lives in the source tree (``flatkern/_C.<abi>.so``): what an editable install imports."""
                filename = os.path.basename(self.get_ext_filename(self.get_ext_fullname(ext.name)))
                return os.path.join(ROOT, *ext.name.split(".")[:-1], filename)

            def _built_path(self, ext):
                """Where this build writes the extension (under ``build_lib``), whether or not it is copied in place."""
                return os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))

            def _fingerprint(self, ext):
                """SHA-256 over everything the built file depends on (see the module docstring)."""
                import torch

                def command(name):
                    return list(getattr(self.compiler, name, None) or [])

                compiler_version = ""
                if command("compiler_so"):
                    try:
                        compiler_version = subprocess.run([command("compiler_so")[0], "--version"],
                                                          capture_output=True, text=True, timeout=60).stdout
                    except (OSError, subprocess.SubprocessError):
                        pass
                files = sorted(p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
                               if os.path.isfile(p))
                inputs = {
                    "files": {os.path.relpath(p, ROOT): _sha256(p) for p in files + [os.path.join(ROOT, "setup.py")]},
                    "extension": {k: getattr(ext, k, None) for k in (
                        "name", "sources", "include_dirs", "define_macros", "undef_macros", "library_dirs",
                        "libraries", "runtime_library_dirs", "extra_objects", "extra_compile_args",
                        "extra_link_args", "language")},
                    "compiler": [command("compiler_so"), command("compiler_cxx"), command("linker_so"),
                                 self.compiler.compiler_type, compiler_version],
                    "torch": [torch.__version__, torch.version.git_version, bool(torch._C._GLIBCXX_USE_CXX11_ABI)],
                    "python": [sys.version, sysconfig.get_config_var("EXT_SUFFIX")],
                }
                return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()

            def _read_stamp(self):
                try:
                    with open(STAMP_PATH) as f:
                        return json.load(f)
                except (OSError, ValueError):
                    return {}

            def _up_to_date(self, ext, stamp):
                """The in-place .so was built from exactly these inputs (and is that very file)."""
                entry, path = stamp.get(ext.name) or {}, self._inplace_path(ext)
                return (entry.get("fingerprint") == self._fingerprints[ext.name] and os.path.isfile(path)
                        and entry.get("sha256") == _sha256(path))

            def build_extensions(self):
                compile_args, link_args, openmp = _platform_flags(self.compiler)
                for ext in self.extensions:
                    ext.extra_compile_args = {"cxx": compile_args}
                    ext.extra_link_args = link_args
                self._fingerprints = {ext.name: self._fingerprint(ext) for ext in self.extensions}
                stamp = self._read_stamp()
                if all(self._up_to_date(ext, stamp) for ext in self.extensions):
                    for ext in self.extensions:
                        # the build directory gets the kept file, so a wheel built from here holds it too
                        target = self._built_path(ext)
                        if os.path.abspath(target) != self._inplace_path(ext):
                            os.makedirs(os.path.dirname(target), exist_ok=True)
                            shutil.copy2(self._inplace_path(ext), target)
                    self._reused = {ext.name for ext in self.extensions}
                    import torch

                    _say(f"flatkern: the C++ extension flatkern._C is up to date (built from these sources and "
                         f"flags for torch {torch.__version__}): kept, not recompiled "
                         f"(delete {os.path.relpath(STAMP_PATH, ROOT)} to force a rebuild)")
                    return
                jobs = f"MAX_JOBS={os.environ['MAX_JOBS']} at a time" if os.environ.get("MAX_JOBS") else "in parallel"
                _say(f"flatkern: compiling {len(sources)} C++ sources ({openmp}; {jobs}; about 2 minutes of "
                     f"one core): {', '.join(sources)}")
                # one line per compiled object; on Windows torch's own ninja run (it sets up MSVC's environment)
                patch = os.name != "nt" and hasattr(cpp_extension, "_run_ninja_build")
                original = getattr(cpp_extension, "_run_ninja_build", None)
                if patch:
                    cpp_extension._run_ninja_build = _run_ninja_with_progress
                start = time.monotonic()
                try:
                    super().build_extensions()
                finally:
                    if patch:
                        cpp_extension._run_ninja_build = original
                _say(f"flatkern: the C++ extension flatkern._C is built ({_minutes(time.monotonic() - start)})")

            def copy_extensions_to_source(self):
                """Editable installs: the built file moved into ``flatkern/`` (kept files stay as they are).

                A new file renamed over the old one rather than the old one
                overwritten, so a process that has the old extension loaded keeps
                running instead of crashing on a truncated mapping.
                """
                for ext in self.extensions:
                    built, inplace = self._built_path(ext), self._inplace_path(ext)
                    if ext.name in self._reused or os.path.abspath(built) == inplace:
                        continue
                    tmp = f"{inplace}.{os.getpid()}.tmp"
                    shutil.copy2(built, tmp)
                    os.replace(tmp, inplace)

            def _write_stamp(self):
                stamp = self._read_stamp()
                for ext in self.extensions:
                    built = self._built_path(ext)
                    if ext.name in self._reused or not os.path.isfile(built):
                        continue
                    stamp[ext.name] = {"fingerprint": self._fingerprints[ext.name], "sha256": _sha256(built)}
                tmp = f"{STAMP_PATH}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(stamp, f, indent=1)
                os.replace(tmp, STAMP_PATH)

            def _remove_stale(self):
                """After a failed build: an in-place .so from other inputs would still be imported; remove it."""
                for ext in self.extensions:
                    path = self._inplace_path(ext)
                    if os.path.isfile(path):
                        os.remove(path)  # unlinking leaves the file to processes that have it loaded
                        _say(f"flatkern: removed {os.path.relpath(path, ROOT)}, built from other sources or flags")

            def run(self):
                global _log
                os.makedirs(os.path.dirname(LOG_PATH), exist_ok=True)
                _log = open(LOG_PATH, "w")
                try:
                    _say(f"flatkern: building the C++ extension flatkern._C (log: {LOG_PATH})")
                    try:
                        super().run()
                    except Exception as exc:  # noqa: BLE001 - any build failure
                        if _flag("FLATKERN_FORCE_CPP_BUILD"):
                            raise
                        _say(f"flatkern: the C++ extension did not build ({exc}); installing the plain-torch "
                             "package (set FLATKERN_FORCE_CPP_BUILD=1 to make this an error)")
                        self._remove_stale()
                        return
                    self._write_stamp()
                finally:
                    _log.close()
                    _log = None

        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
