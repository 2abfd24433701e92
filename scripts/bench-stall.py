#!/usr/bin/env python3
"""Freezes the running payoutd now and then, to test that its sends stay within the limit on
the wire when the process stalls between admitting a request and writing it.

    scripts/bench-stall.py STALL_MS PERIOD_S DURATION_S &
    target/release/payout-bench --rows 100000 --limit 1000 --latency-ms 20 --jitter-ms 10 --transit ...

Waits for a process named `payoutd`, then every PERIOD_S seconds sends it SIGSTOP, sleeps
STALL_MS and sends SIGCONT, until it exits or DURATION_S have passed. Prints how many stalls it
made. Only the standard library; run it as the user that runs the benchmark.
"""
import os
import signal
import subprocess
import sys
import time


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    stall = float(sys.argv[1]) / 1000
    period = float(sys.argv[2])
    end = time.time() + float(sys.argv[3])
    pid = None
    while pid is None and time.time() < end:
        found = subprocess.run(["pgrep", "-x", "payoutd"], capture_output=True, text=True)
        pid = int(found.stdout.split()[0]) if found.stdout.split() else None
        time.sleep(0.2)
    stalls = 0
    while pid is not None and time.time() < end:
        time.sleep(period)
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stall)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            break
        stalls += 1
    print(f"bench-stall: froze payoutd {stalls} times for {stall * 1000:.0f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
