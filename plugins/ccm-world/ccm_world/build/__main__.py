"""``python -m ccm_world.build``: the same as ``ccm-world build``."""

import sys

from .cli import main

sys.exit(main())
