"""``python -m shiftkit`` runs the command line."""

from __future__ import annotations

import sys

from shiftkit.cli import main

sys.exit(main())
