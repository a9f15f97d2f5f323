"""Script form of `mixpipe bench overhead` (see mixpipe/bench/overhead.py)."""
import sys

from mixpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overhead", *sys.argv[1:]]))
