"""``python -m osbc.cli``: the osbc command."""

import sys

from .main import main

sys.exit(main())
