"""Matrix completion at scale, time and peak memory: ``flatkern.benchmarks.completion_memory``."""

from flatkern.benchmarks.completion_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
