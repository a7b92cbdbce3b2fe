"""Run ``pyrobnn`` in a child process that pauses before handing out training batch N, so a test can
signal it at a known step. Nothing in pyrobnn is changed; the data loader's iterator is wrapped in this
child only.

    python tests/_paused_cli.py MARKER N WAIT CLI-ARGS...

The first batch counted is ``fit``'s initialisation batch. At batch N the child writes MARKER, then
``WAIT=sigkill`` sleeps until it is killed; ``WAIT=sigint`` waits until pyrobnn's interrupt handler has
seen a signal and then goes on (so the step in progress finishes, as after a real Ctrl-C).
"""
import signal
import sys
import time

import pyrobnn.data as data

marker, pause_at, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3]
original, count = data.ArrayLoader.batches, [0]


def batches(self, start=0):
    for batch in original(self, start):
        count[0] += 1
        if count[0] == pause_at:
            with open(marker, "w") as f:
                f.write(f"waiting for {wait}")
            if wait == "sigkill":
                time.sleep(600)
            guard = signal.getsignal(signal.SIGINT).__self__
            while guard.signum is None:
                time.sleep(0.01)
        yield batch


data.ArrayLoader.batches = batches
from pyrobnn.cli import main  # noqa: E402

sys.exit(main(sys.argv[4:]))
