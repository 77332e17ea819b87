"""``python -m qomfs.ga``: the same as ``qemu-ga-client``."""

import sys

from qomfs.ga.main import main

sys.exit(main())
