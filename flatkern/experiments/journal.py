"""Finished work on disk: the records journal of ``flatkern reproduce``, the ``--out`` lock, and atomic file writes.

Every finished task is appended to a JSON-lines journal in ``--out`` the moment
it finishes (flushed and fsynced), so an interrupted run loses at most the
tasks that were still running.  ``records.jsonl`` is written by the single
process (or torchrun's rank 0); rank ``k > 0`` writes ``records.rank{k}.jsonl``.
The first line of each file is a header naming the grid; every other line is
one task; every line carries the checksum of the rest of it::

    {"flatkern_reproduce": 2, "grid": "quick", "backend": "auto", "fingerprint": "…", "tasks": 15, "command": "…", "sha256": "…"}
    {"index": 3, "task": ["sensing", "networks", 2, 200, 0], "seconds": 4.1, "records": [...], "sha256": "…"}

``sha256`` is the first 16 hex digits of the SHA-256 of the line's other keys
(``json.dumps(..., sort_keys=True)``).  Only the last line can be cut short
(a kill during a write): a tail without its newline is ignored when reading and
cut off before the next append.  Any other line that is not the journal's own
(not JSON, not an object, a wrong checksum, a task this grid does not have,
records whose methods, fields or types this grid's experiment does not write)
is refused with its file and line number and how to recover, never skipped:
``results.json`` must hold every record of the grid, computed by flatkern.

``--resume`` continues from the union of the journals in ``--out`` (every
header must match the grid and backend asked for).  Records are deterministic
per task (own seeds, one thread; wall times stay out of ``results.json``), and
JSON round-trips floats exactly, so a resumed run ends with the same
``results.json`` as an uninterrupted one.  Once ``results.json`` is written the
journals are removed.

One run per ``--out`` at a time: the run holds ``OutLock`` (an ``flock`` on
``--out/.flatkern-reproduce.lock``, which holds the owner's pid).  The kernel
releases an ``flock`` when its process dies, so the lock of a killed run is
stale at once and the next run takes it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

__all__ = ["JournalError", "fingerprint", "journal_name", "read_journals", "check_out", "prepare", "Journal", "OutLock",
           "remove_journals", "atomic_write", "checksum", "LOCK_NAME"]

# 3: recovery tasks hold their seeds (a tuple: networks batched), and their order changed
_VERSION = 3
LOCK_NAME = ".flatkern-reproduce.lock"


class JournalError(ValueError):
    """The journals or the state of ``--out`` do not allow what was asked (resume another grid, overwrite unfinished work, ...)."""


def fingerprint(grid, backend: str) -> str:
    """A digest of everything the records depend on: the grid's every setting and the backend."""
    return hashlib.sha256(repr((grid, backend)).encode()).hexdigest()[:16]


def checksum(obj: dict) -> str:
    """The ``sha256`` field of a journal line: 16 hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def journal_name(rank: int) -> str:
    return "records.jsonl" if rank == 0 else f"records.rank{rank}.jsonl"


def _journals(out: Path) -> list[Path]:
    return sorted(out.glob("records*.jsonl"))


def _recovery(out: Path) -> str:
    return (f"To recover, delete that line (its task runs again) and run the same command again, "
            f"or start over (--overwrite, or remove {out}/records*.jsonl), or choose another --out.")


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end in a newline; a last line without one is a write cut short by a kill."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()


def _parse(path: Path, number: int, line: str) -> dict:
    """One journal line as a dict whose checksum holds, or ``JournalError`` naming the file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        why = f"not JSON ({exc.msg})"
    else:
        if not isinstance(obj, dict):
            why = f"not a journal line (a JSON {type(obj).__name__}, not an object)"
        elif "sha256" not in obj:
            why = "not a journal line (no checksum)"
        else:
            body = {k: v for k, v in obj.items() if k != "sha256"}
            if checksum(body) == obj["sha256"]:
                return body
            why = "its checksum does not match its content (the line was edited)"
    raise JournalError(f"{path}, line {number}: {why}. " + _recovery(path.parent))


def read_journals(out: Path) -> tuple[list[dict], dict[int, dict]]:
    """``(headers, {task index: entry})`` from every journal in ``out``.

    A torn last line is skipped; any other line that is not the journal's own
    raises ``JournalError`` naming it.  The entries are not yet checked against
    a grid (``prepare`` does that).
    """
    headers, entries = [], {}
    for path in _journals(out):
        lines = _complete_lines(path)
        if not lines:
            continue  # only a torn header: nothing was saved
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict) and "flatkern_reproduce" in first and first["flatkern_reproduce"] != _VERSION:
            raise JournalError(f"{path} is a journal of another flatkern version (format {first['flatkern_reproduce']}, "
                               f"this one writes {_VERSION}): finish that run with that version, or remove "
                               f"{out}/records*.jsonl, or choose another --out")
        header = _parse(path, 1, lines[0])
        if "flatkern_reproduce" not in header:
            raise JournalError(f"{path}, line 1: not a flatkern reproduce journal header. " + _recovery(out))
        headers.append(dict(header, path=str(path)))
        for number, line in enumerate(lines[1:], start=2):
            entry = _parse(path, number, line)
            if not (isinstance(entry.get("index"), int) and isinstance(entry.get("task"), list)
                    and isinstance(entry.get("records"), list) and isinstance(entry.get("seconds"), (int, float))):
                raise JournalError(f"{path}, line {number}: not a task entry (index, task, seconds, records). "
                                   + _recovery(out))
            entries[entry["index"]] = dict(entry, path=str(path), line=number)
    return headers, entries


def _problem(entry: dict, task, experiment) -> str | None:
    """Why ``entry`` is not a record set ``experiment`` writes for ``task`` (``None`` if it is)."""
    methods = experiment.methods(task)
    records = entry["records"]
    if not all(isinstance(r, dict) for r in records):
        return "its records are not all JSON objects"
    if [r.get("method") for r in records] != list(methods):
        return f"its records have methods {[r.get('method') for r in records]}, the task writes {list(methods)}"
    key = json.loads(json.dumps(task._asdict()))
    for r in records:
        for field, types in experiment.fields.items():
            if field not in r:
                return f"a '{r['method']}' record has no field '{field}'"
            value = r[field]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return (f"the '{r['method']}' record's field '{field}' is {value!r}, "
                        f"not of type {' or '.join(t.__name__ for t in types)}")
        for field, value in key.items():
            if field in r and r[field] != value:
                return f"the '{r['method']}' record's {field} is {r[field]!r}, its task's is {value!r}"
    if "seeds" in key:  # a task of several seeds (one batch of problems) writes their records seed by seed
        per = len(records) // max(len(key["seeds"]), 1)
        expected = [seed for seed in key["seeds"] for _ in range(per)]
        if [r.get("seed") for r in records] != expected:
            return f"its records have seeds {[r.get('seed') for r in records]}, the task writes {expected}"
    return None


def check_out(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Check ``--out`` before any work, create it, and prove a file can be written there.

    Raises ``JournalError`` when ``out`` is a file, or holds a finished run
    (``results.json``) and neither ``resume`` nor ``overwrite`` is set;
    ``OSError`` when it cannot be created or written.
    """
    if out.exists() and not out.is_dir():
        raise JournalError(f"{out} is a file, not a folder")
    if not (resume or overwrite) and (out / "results.json").exists():
        raise JournalError(f"{out} holds a finished run (results.json); pass --overwrite to replace it, "
                           f"or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".flatkern-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def prepare(out: Path, grid, tasks: list, backend: str, *, resume: bool, command: str,
            overwrite: bool = False) -> dict[int, dict]:
    """Check the journals in ``out`` against this run; return the entries it can keep (``{}`` unless resuming).

    A fresh run refuses to overwrite an unfinished run's records (``JournalError``)
    unless ``overwrite``; a finished one's journals are removed.  ``--resume``
    refuses a journal of another grid or backend, a line this grid cannot have
    written, and an ``out`` with nothing to resume.
    """
    if overwrite and not resume:
        remove_journals(out)  # asked to start over: whatever the journals hold, unread
        return {}
    headers, entries = read_journals(out)
    mine = fingerprint(grid, backend)

    def resume_hint(h):
        return f"{h.get('command', 'flatkern reproduce')} --out {shlex.quote(str(out))} --resume"

    if not resume:
        expected = max((h.get("tasks", 0) for h in headers), default=0)
        if len(entries) < expected and not overwrite:
            h = headers[0]
            raise JournalError(
                f"{out} holds an unfinished run ({len(entries)} of {expected} tasks done, grid '{h.get('grid')}'); "
                f"continue it with `{resume_hint(h)}`, or pass --overwrite to start over, or choose another --out")
        remove_journals(out)  # a finished run's (stopped while writing its results), or --overwrite
        return {}
    if not headers:
        raise JournalError(f"nothing to resume: {out} has no records.jsonl (was --out the same as the interrupted run's?)")
    for h in headers:
        if h.get("fingerprint") != mine:
            if h.get("grid") != grid.name or h.get("backend") != backend:
                why = f"grid '{h.get('grid')}' with backend '{h.get('backend')}', not grid '{grid.name}' with backend '{backend}'"
            else:
                why = f"grid '{grid.name}' with other settings (written by another flatkern version?)"
            raise JournalError(f"cannot resume: {h['path']} holds records of {why}; "
                               f"resume with the options the run started with: `{resume_hint(h)}`, or choose another --out")
    for index, entry in sorted(entries.items()):
        where = f"{entry['path']}, line {entry['line']}"
        if not 0 <= index < len(tasks) or json.loads(json.dumps(tasks[index])) != entry["task"]:
            expected = tasks[index] if 0 <= index < len(tasks) else "none"
            raise JournalError(f"cannot resume: {where}: task {index} is {entry['task']}, this grid's is {expected}. "
                               + _recovery(out))
        why = _problem(entry, tasks[index], grid.part(tasks[index].experiment)[0])
        if why is not None:
            raise JournalError(f"cannot resume: {where}: {why}. " + _recovery(out))
    return {index: {k: v for k, v in entry.items() if k not in ("path", "line")} for index, entry in entries.items()}


class Journal:
    """The append-only records file of one process (rank)."""

    def __init__(self, out: Path, rank: int, grid, tasks: list, backend: str, command: str):
        self.path = out / journal_name(rank)
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                # a write cut short by a kill: appending after it would glue the next line onto it
                os.truncate(self.path, cut)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a")
        if fresh:
            self._write(dict(flatkern_reproduce=_VERSION, grid=grid.name, backend=backend,
                             fingerprint=fingerprint(grid, backend), tasks=len(tasks), command=command))

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(dict(obj, sha256=checksum(obj))) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, index: int, task, records: list[dict], seconds: float) -> None:
        """Record one finished task; it is on disk when this returns."""
        self._write(dict(index=index, task=json.loads(json.dumps(task)), seconds=seconds, records=records))

    def close(self) -> None:
        self._file.close()


class OutLock:
    """One run per ``--out``: an exclusive ``flock`` on ``out/.flatkern-reproduce.lock``, which holds the owner's pid.

    ``acquire`` raises ``JournalError`` naming the owner's pid while another
    live process holds it.  A lock file left by a process that died is not
    held (the kernel drops an ``flock`` with its process), so it is taken over.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise JournalError(f"{self.path.parent} is in use by another flatkern reproduce run (pid {owner}); "
                                   "wait for it to finish or stop it, or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its owner removed the file while we waited for it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks the old file after us
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def remove_journals(out: Path) -> None:
    """Once ``results.json`` holds every record, the journals have done their job."""
    for path in _journals(out):
        path.unlink()


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, then rename over ``path``: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
