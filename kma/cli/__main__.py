"""`python -m kma.cli ...`: the `kma` command without the console script."""

import sys

from kma.cli.parser import main

sys.exit(main())
