#!/usr/bin/env python3
"""Stalls payoutd now and then, to test that its sends stay within the limit on the wire when
it stops between admitting a request and writing it.

    scripts/bench-stall.py STALL_MS PERIOD_S DURATION_S &
    scripts/bench-stall.py --steal PERCENT MAX_MS DURATION_S &
    target/release/payout-bench --rows 100000 --limit 1000 --latency-ms 20 --jitter-ms 10 --transit ...

Both forms wait for a process named `payoutd` (a build given to the bench with `--payoutd`
must be named so too: `/tmp/a/payoutd`, not `/tmp/payoutd-a`), then stall until it exits or
DURATION_S have passed, and print how many stalls they made.

The first form freezes the whole process: every PERIOD_S seconds it sends payoutd SIGSTOP,
sleeps STALL_MS and sends SIGCONT. Run it as the user that runs the benchmark.

The second form stands in for a hypervisor that takes one virtual CPU at a time: at random
moments (a Poisson process) it takes one CPU, chosen at random, for 1 to MAX_MS milliseconds
(uniform), by spinning on it at real-time priority (SCHED_FIFO), so that whatever thread ran
there, one of payoutd's or another process's, stops mid-step while the other CPUs go on. It
takes PERCENT per cent of all the CPUs' time on average. Needs root (or CAP_SYS_NICE); the
kernel's real-time throttling (`sched_rt_runtime_us`) is left as it is.

Only the standard library.
"""
import os
import random
import signal
import subprocess
import sys
import time


def wait_for_payoutd(end):
    while time.time() < end:
        found = subprocess.run(["pgrep", "-x", "payoutd"], capture_output=True, text=True)
        if found.stdout.split():
            return int(found.stdout.split()[0])
        time.sleep(0.2)
    return None


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def freeze(stall_ms, period_s, duration_s):
    stall = stall_ms / 1000
    end = time.time() + duration_s
    pid = wait_for_payoutd(end)
    stalls = 0
    while pid is not None and time.time() < end:
        time.sleep(period_s)
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stall)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            break
        stalls += 1
    print(f"bench-stall: froze payoutd {stalls} times for {stall_ms:.0f} ms", file=sys.stderr)


def steal(percent, max_ms, duration_s):
    if not 0 < percent < 50:
        sys.exit(f"bench-stall: PERCENT must be above 0 and below 50, not {percent}")
    if max_ms < 1:
        sys.exit(f"bench-stall: MAX_MS must be at least 1, not {max_ms}")
    end = time.time() + duration_s
    pid = wait_for_payoutd(end)
    cpus = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except PermissionError:
        sys.exit("bench-stall: --steal needs root (or CAP_SYS_NICE) for SCHED_FIFO")
    rng = random.Random()
    mean_s = (1 + max_ms) / 2 / 1000
    # Stalls per second so that, on average, PERCENT of all CPUs' time is taken.
    rate = percent / 100 * len(cpus) / mean_s
    stalls, taken, started = 0, 0.0, time.time()
    next_at = time.perf_counter() + rng.expovariate(rate)
    while pid is not None and time.time() < end and alive(pid):
        wait = next_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        os.sched_setaffinity(0, {rng.choice(cpus)})
        burn = rng.uniform(1, max_ms) / 1000
        stop = time.perf_counter() + burn
        while time.perf_counter() < stop:
            pass
        stalls += 1
        taken += burn
        next_at += rng.expovariate(rate)
    elapsed = max(time.time() - started, 1e-9)
    print(
        f"bench-stall: took a CPU {stalls} times for 1-{max_ms:.0f} ms, {taken:.1f} s in all, "
        f"{100 * taken / elapsed / len(cpus):.1f} % of {len(cpus)} CPUs over {elapsed:.0f} s",
        file=sys.stderr,
    )


def main():
    args = sys.argv[1:]
    try:
        if len(args) == 4 and args[0] == "--steal":
            steal(float(args[1]), float(args[2]), float(args[3]))
        elif len(args) == 3:
            freeze(float(args[0]), float(args[1]), float(args[2]))
        else:
            sys.exit(__doc__)
    except ValueError as e:
        sys.exit(f"bench-stall: numbers expected: {e}\n\n{__doc__}")


if __name__ == "__main__":
    main()
