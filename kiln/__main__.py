from __future__ import annotations

import sys

from kiln.cli import main

sys.exit(main())
