"""Script form of `mixpipe bench server` (see mixpipe/bench/server.py)."""
import sys

from mixpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "server", *sys.argv[1:]]))
