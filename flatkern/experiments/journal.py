"""Finished work on disk: the records journal of ``flatkern reproduce`` and atomic file writes.

Every finished task is appended to a JSON-lines journal in ``--out`` the moment
it finishes (flushed and fsynced), so an interrupted run loses at most the
tasks that were still running.  ``records.jsonl`` is written by the single
process (or torchrun's rank 0); rank ``k > 0`` writes ``records.rank{k}.jsonl``.
The first line of each file is a header naming the grid; every other line is
one task::

    {"flatkern_reproduce": 1, "grid": "quick", "fingerprint": "…", "tasks": 40, "command": "flatkern reproduce --quick"}
    {"index": 3, "task": ["sensing", "networks", 2, 200, 0], "seconds": 4.1, "records": [...]}

``--resume`` continues from the union of the journals in ``--out`` (every
header must match the grid and backend asked for); a last line cut short by a
kill is ignored.  Records are deterministic per task (own seeds, one thread;
wall times stay out of ``results.json``), and JSON round-trips floats exactly,
so a resumed run ends with the same ``results.json`` as an uninterrupted one.
Once ``results.json`` is written the journals are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

__all__ = ["JournalError", "fingerprint", "journal_name", "read_journals", "check_out", "prepare", "Journal",
           "remove_journals", "atomic_write"]

_VERSION = 1


class JournalError(ValueError):
    """The journals in ``--out`` do not allow what was asked (resume a different grid, overwrite unfinished work)."""


def fingerprint(grid, backend: str) -> str:
    """A digest of everything the records depend on: the grid's every setting and the backend."""
    return hashlib.sha256(repr((grid, backend)).encode()).hexdigest()[:16]


def journal_name(rank: int) -> str:
    return "records.jsonl" if rank == 0 else f"records.rank{rank}.jsonl"


def _journals(out: Path) -> list[Path]:
    return sorted(out.glob("records*.jsonl"))


def read_journals(out: Path) -> tuple[list[dict], dict[int, dict]]:
    """``(headers, {task index: entry})`` from every journal in ``out``; a torn last line is skipped."""
    headers, entries = [], {}
    for path in _journals(out):
        lines = path.read_text().splitlines()
        if not lines:
            continue
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        headers.append(dict(header, path=str(path)))
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the write a kill cut short: that task runs again
            entries[entry["index"]] = entry
    return headers, entries


def check_out(out: Path) -> None:
    """Create ``out`` if needed and prove a file can be written there; ``OSError`` if not."""
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".flatkern-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def prepare(out: Path, grid, tasks: list[tuple], backend: str, *, resume: bool, command: str) -> dict[int, dict]:
    """Check the journals in ``out`` against this run; return the entries it can keep (``{}`` unless resuming).

    A fresh run refuses to overwrite an unfinished run's records (``JournalError``);
    a finished one's journals are removed.  ``--resume`` refuses a journal of
    another grid or backend, and an ``out`` with nothing to resume.
    """
    headers, entries = read_journals(out)
    mine = fingerprint(grid, backend)

    def resume_hint(h):
        return f"{h.get('command', 'flatkern reproduce')} --out {shlex.quote(str(out))} --resume"

    if not resume:
        expected = max((h.get("tasks", 0) for h in headers), default=0)
        if len(entries) < expected:
            h = headers[0]
            raise JournalError(
                f"{out} holds an unfinished run ({len(entries)} of {expected} tasks done, grid '{h.get('grid')}'); "
                f"continue it with `{resume_hint(h)}`, or remove {out}/records*.jsonl, or choose another --out")
        remove_journals(out)  # a finished run's (stopped while writing its results)
        return {}
    if not headers:
        raise JournalError(f"nothing to resume: {out} has no records.jsonl (was --out the same as the interrupted run's?)")
    for h in headers:
        if h.get("flatkern_reproduce") != _VERSION:
            raise JournalError(f"cannot resume: {h['path']} is not a flatkern reproduce journal of this version")
        if h["fingerprint"] != mine:
            if h.get("grid") != grid.name or h.get("backend") != backend:
                why = f"grid '{h.get('grid')}' with backend '{h.get('backend')}', not grid '{grid.name}' with backend '{backend}'"
            else:
                why = f"grid '{grid.name}' with other settings (written by another flatkern version?)"
            raise JournalError(f"cannot resume: {h['path']} holds records of {why}; "
                               f"resume with the options the run started with: `{resume_hint(h)}`, or choose another --out")
    for index, entry in entries.items():
        if not 0 <= index < len(tasks) or json.loads(json.dumps(tasks[index])) != entry["task"]:
            raise JournalError(f"cannot resume: the journal's task {index} is {entry['task']}, this grid's is {tasks[index] if 0 <= index < len(tasks) else 'none'}")
    return entries


class Journal:
    """The append-only records file of one process (rank)."""

    def __init__(self, out: Path, rank: int, grid, tasks: list[tuple], backend: str, command: str):
        self.path = out / journal_name(rank)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a")
        if fresh:
            self._write(dict(flatkern_reproduce=_VERSION, grid=grid.name, backend=backend,
                             fingerprint=fingerprint(grid, backend), tasks=len(tasks), command=command))

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, index: int, task: tuple, records: list[dict], seconds: float) -> None:
        """Record one finished task; it is on disk when this returns."""
        self._write(dict(index=index, task=list(task), seconds=seconds, records=records))

    def close(self) -> None:
        self._file.close()


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
