"""One contender in the lease race of tests/test_lease.py (run as a script).

argv: base_uri rounds t0 gap_s mode. For each round k it waits until t0 + k*gap_s, then
tries once to take the lease of `<base>/r<k>` and prints `k won` or `k lost`. In mode
"stale" each round's folder starts with a stale lease that both contenders race to take
over. A winner writes `<base>/r<k>/w-<pid>` and keeps the lease (never released, renewal
stopped; it goes stale only long after the test), so a contender that arrives late under
load still finds it held: at most one writer per folder, whatever the timing.
"""

import sys
import time

from rcig import lease, storage


def main() -> None:
    base, rounds, t0, gap, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    for k in range(rounds):
        folder = storage.join(base, f"r{k}")
        time.sleep(max(0.0, t0 + k * gap - time.time()))
        try:
            held = lease.acquire(folder, wait_s=0, heartbeat=30)
        except lease.LeaseHeld:
            print(f"{k} lost", flush=True)
            continue
        storage.write_text(storage.join(folder, f"w-{held.doc['pid']}"), "x")
        print(f"{k} won", flush=True)
        held._done.set()
    _ = mode


if __name__ == "__main__":
    main()
