"""Child process for the crash test: adds entries from several threads until it is SIGKILLed.

Usage: python crash_child.py DB SIGNER_KEY_FILE RESULTS_FILE TAG
Each resolved future appends "index hex(entry)" to RESULTS_FILE with one O_APPEND write, so every
complete line is an entry whose add() had resolved before the kill.
"""

import os
import random
import sys
import threading

from fieldprint.ledger.log import TransparencyLog


def main() -> None:
    db, key_file, results, tag = sys.argv[1:5]
    with open(key_file) as f:
        signer = f.read().strip()
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    log = TransparencyLog.open(db, signer, batch_size=64, batch_wait_ms=0.5, checkpoint_interval_s=0.02)

    def record(entry: bytes):
        def done(fut):
            if fut.exception() is None:
                os.write(fd, b"%d %s\n" % (fut.result(), entry.hex().encode()))

        return done

    def produce(k: int) -> None:
        rng = random.Random(f"{tag}-{k}")
        for i in range(10**9):
            entry = f"{tag}-{k}-{i}-".encode() + rng.randbytes(rng.randrange(0, 200))
            log.add(entry).add_done_callback(record(entry))
            if i % 50 == 49:
                log.flush()
                if k == 0:
                    log.checkpoint()

    threads = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
