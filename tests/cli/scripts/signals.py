"""Records which signal reached it: DIR/<rank>-<SIGNAME>. SIGUSR1: exits 0; SIGTERM: ignored (keeps running).

    signals.py DIR        (touches DIR/<rank>-up once its handlers are in place)
"""

import os
import signal
import sys
import time

out, rank = sys.argv[1], os.environ["RANK"]


def record(signum, _frame):
    open(os.path.join(out, f"{rank}-{signal.Signals(signum).name}"), "w").close()
    if signum == signal.SIGUSR1:
        sys.exit(0)


signal.signal(signal.SIGUSR1, record)
signal.signal(signal.SIGTERM, record)
open(os.path.join(out, f"{rank}-up"), "w").close()
print(f"{os.getpid()}", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
