"""Load test of the selection server: 16 client processes over loopback (see mixpipe/bench/load.py).

    python benchmarks/load.py [--quick]
"""
import sys

from mixpipe.bench.load import main

if __name__ == "__main__":
    sys.exit(main())
