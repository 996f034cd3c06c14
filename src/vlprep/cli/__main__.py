import sys

from vlprep.cli import main

sys.exit(main())
