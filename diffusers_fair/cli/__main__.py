"""``python -m diffusers_fair.cli``."""

import sys

from . import main


sys.exit(main())
