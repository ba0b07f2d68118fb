"""``python -m osbc``: the osbc command."""

import sys

from .cli import main

sys.exit(main())
