"""Script form of `mixpipe bench speedup` (see mixpipe/bench/speedup.py)."""
import sys

from mixpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speedup", *sys.argv[1:]]))
