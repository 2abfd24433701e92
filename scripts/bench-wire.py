#!/usr/bin/env python3
"""Where a benchmark's requests spent their time on the way to money-sim, from a packet capture.

Capture loopback while `payout-bench --transit` runs (tcpdump from Debian's package):

    tcpdump -i lo -s 400 -w /tmp/cap.pcap 'tcp and not port 3306 and (tcp[tcpflags] & tcp-push != 0)' &
    target/release/payout-bench --rows 200000 --limit 1000 --transit --sim-process --out bench-results/NAME.json
    kill %1
    scripts/bench-wire.py /tmp/cap.pcap bench-results/NAME [LIMIT]

It pairs each request's admission in payoutd (the daemon log's `admitted` lines), its time on
the wire (the capture) and its arrival at money-sim (`NAME.transit.csv`) by Idempotency-Key,
prints the delays admission -> wire (payoutd) and wire -> arrival (money-sim), the slowest
requests, and the most requests in any one second on each clock. Only the standard library.

The daemon's `departed` lines (a request's connection took its body to write it) give the time
its send log counts a request from: the departure when it was more than 1 ms after the
admission, else the admission. Every one-second window on the wire holding more than LIMIT
(default 1000) requests is listed with the requests in it that the send log counted earliest,
so an excess shows which requests left later than payoutd counted them.
"""
import json
import re
import struct
import sys

KEY = re.compile(rb"(?i)idempotency-key:\s*([^\r\n]+)")


def posts(pcap):
    """(unix us, idempotency key) of every packet that starts an HTTP POST."""
    out = []
    with open(pcap, "rb") as f:
        header = f.read(24)
        nano = struct.unpack("<I", header[:4])[0] == 0xA1B23C4D
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return out
            sec, frac, incl, _ = struct.unpack("<IIII", rec)
            data = f.read(incl)
            tcp = 14 + (data[14] & 0x0F) * 4
            payload = data[tcp + (data[tcp + 12] >> 4) * 4:]
            if payload.startswith(b"POST"):
                m = KEY.search(payload)
                at = sec * 1_000_000 + (frac // 1000 if nano else frac)
                out.append((at, m.group(1).decode() if m else None))


def traced(log, message):
    """The fields of the daemon's JSON log lines with this message that carry a key and a time."""
    for line in open(log):
        if f'"{message}"' not in line:
            continue
        try:
            entry = json.loads(line)
            fields = entry.get("fields", entry)
        except ValueError:
            continue
        if fields.get("key") and fields.get("at_unix_us"):
            yield fields


def admissions(log):
    """unix us -> key, from the daemon's JSON log."""
    out = {}
    for fields in traced(log, "admitted"):
        out.setdefault(fields["at_unix_us"], fields["key"])
    return out


def departures(log):
    """key -> (unix us of the departure, us after the admission), from the daemon's JSON log."""
    out = {}
    for fields in traced(log, "departed"):
        out.setdefault(fields["key"], (int(fields["at_unix_us"]), int(fields.get("after_admission_us", 0))))
    return out


def windows_over(times, limit):
    """Start times of the one-second windows (each starting at a time in `times`) holding more
    than `limit` of them, merged into (first start, last start, most held) runs."""
    times = sorted(times)
    runs, hi = [], 0
    for lo, t in enumerate(times):
        while hi < len(times) and times[hi] - t < 1_000_000:
            hi += 1
        n = hi - lo
        if n > limit:
            if runs and t - runs[-1][1] < 1_000_000:
                first, _, most = runs[-1]
                runs[-1] = (first, t, max(most, n))
            else:
                runs.append((t, t, n))
    return runs


def max_in_second(times):
    times = sorted(times)
    lo, best, at = 0, 0, 0
    for i, t in enumerate(times):
        while t - times[lo] >= 1_000_000:
            lo += 1
        if i - lo + 1 > best:
            best, at = i - lo + 1, t
    return best, (at - times[0]) / 1e6 if times else 0.0


def quantiles(name, values):
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000
    print(f"{name:16s} p50 {q(.5):.2f}  p99 {q(.99):.2f}  p99.9 {q(.999):.2f}  max {v[-1] / 1000:.2f} ms")


def main(pcap, prefix, limit=1000):
    wire_all = posts(pcap)
    wire = {}
    for at, key in wire_all:
        if key:
            wire.setdefault(key, []).append(at)
    admitted = admissions(prefix + ".daemon.log")
    rows = []
    with open(prefix + ".transit.csv") as f:
        next(f)
        for line in f:
            a, r = map(int, line.split(",")[:2])
            key = admitted.get(a)
            # A retried key was sent more than once: take its send just after this admission.
            sends = [w for w in wire.get(key, []) if w >= a - 1000]
            if key and sends:
                rows.append((a, min(sends), r))
    print(f"{len(wire_all)} POSTs captured, {len(rows)} paired with an admission and an arrival")
    quantiles("admission->wire", [w - a for a, w, r in rows])
    quantiles("wire->arrival", [r - w for a, w, r in rows])
    t0 = min(a for a, w, r in rows)
    print("slowest (seconds after the first admission):")
    for a, w, r in sorted(rows, key=lambda x: x[0] - x[2])[:10]:
        print(f"  {(a - t0) / 1e6:9.3f} s  admission->wire {(w - a) / 1000:7.2f} ms  wire->arrival {(r - w) / 1000:7.2f} ms")
    for name, times in (("admitted", [a for a, _, _ in rows]), ("on the wire", [t for t, _ in wire_all]),
                        ("arrived", [r for _, _, r in rows])):
        n, at = max_in_second(times)
        print(f"most {name} in any second: {n} (ending {at:.3f} s after its first)")
    departed = departures(prefix + ".daemon.log")
    if not departed:
        return
    by_admission = {a: (w, r) for a, w, r in rows}
    counted = []  # (time the send log counts, admission, departure note or None, wire, arrival)
    for a, key in admitted.items():
        if a not in by_admission:
            continue
        w, r = by_admission[a]
        d = departed.get(key)
        at = d[0] if d and d[1] > 1000 else a
        counted.append((at, a, d[0] if d else None, w, r))
    print(f"{len(departed)} departures noted; note -> wire", end=" ")
    quantiles("", [w - d for _, _, d, w, _ in counted if d is not None])
    n, at = max_in_second([c for c, *_ in counted])
    print(f"most counted by the send log in any second: {n} (ending {at:.3f} s after its first)")
    runs = windows_over([w for w, _ in wire_all], limit)
    print(f"{len(runs)} runs of one-second windows on the wire above {limit}")
    for first, last, most in runs[:20]:
        inside = [c for c in counted if first <= c[3] < last + 1_000_000]
        print(f"  {(first - t0) / 1e6:9.3f} s .. {(last - t0) / 1e6:9.3f} s: at most {most}; "
              "counted earliest relative to the wire:")
        for c, a, d, w, r in sorted(inside, key=lambda x: x[0] - x[3])[:5]:
            note = f"{(d - a) / 1000:7.2f}" if d is not None else "      -"
            print(f"      admitted {(a - t0) / 1e6:9.3f} s, departure note +{note} ms, "
                  f"wire +{(w - a) / 1000:7.2f} ms, arrival +{(r - a) / 1000:7.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
