"""Settings shared by the pytest-benchmark files in bench/.

``FLATKERN_BENCH_THREADS=1 pytest bench/...`` pins torch's thread count: on a
machine shared with other jobs, two-thread runs of small problems mostly time
OpenMP waiting for a descheduled thread.
"""

import os

import torch


def pytest_configure(config):
    threads = os.environ.get("FLATKERN_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
