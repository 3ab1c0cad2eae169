"""`python -m bench.profiled OUT.prof ARGS...`: ldapsync with cProfile switched on by SIGUSR1.

SIGUSR2 switches it off and writes OUT.prof, so a profile covers exactly one stretch of a
long-running agent (e.g. one rebuild after one change), not its start-up. The profiler sees
the main thread, which runs every rebuild; the follower thread's decoding is not in it.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType

from ldapsync.cli import main


def run(out: str, argv: list[str]) -> int:
    profiler = cProfile.Profile()

    def start(_signum: int, _frame: FrameType | None) -> None:
        profiler.enable()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
