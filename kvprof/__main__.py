"""Entry point for ``python -m kvprof``."""

import sys

try:
    from kvprof.cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing: no traceback either
    sys.stderr.write("Interrupted.\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
