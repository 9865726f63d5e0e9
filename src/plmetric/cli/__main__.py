"""``python -m plmetric.cli`` (and ``torchrun -m plmetric.cli``): the command line."""

import sys

from plmetric.cli import main

sys.exit(main())
