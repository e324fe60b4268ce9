"""``python -m trainer``: the command line of :mod:`trainer.cli`."""

import sys

from trainer.cli import main

sys.exit(main())
