"""``python -m vlprep.cli``: the ``vlprep`` command."""

import sys

from vlprep.cli import main

if __name__ == "__main__":
    sys.exit(main())
