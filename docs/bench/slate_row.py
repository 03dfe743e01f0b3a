"""The recsys row of ``riverflow bench`` alone, on a local stack of its own.

    python docs/bench/slate_row.py [requests] [rate] [seconds]

Drains ``requests`` ranking requests (default 5,000), then holds ``rate`` requests/s
(default 1,000) for ``seconds`` (default 8), and prints the row's figures as JSON
(``riverflow.tools.bench_slates.measure_slates``). Needs what ``riverflow bench``
needs: Java for the broker, ``redis-server``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from riverflow.settings import Settings
from riverflow.tools.bench_slates import SlateBench, measure_slates
from riverflow.tools.stack import local_stack


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 8.0
    settings = Settings(kafka_bootstrap="", redis_url="")
    with tempfile.TemporaryDirectory() as d, local_stack(settings, Path(d)) as ep:
        print("load", os.getloadavg(), time.strftime("%H:%M:%S"), flush=True)
        bench = SlateBench(requests=n, rate=rate, seconds=seconds)
        out = measure_slates(ep, Path(d), bench, ep.pids, lambda m: print(m, flush=True))
        print("load", os.getloadavg(), time.strftime("%H:%M:%S"))
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
