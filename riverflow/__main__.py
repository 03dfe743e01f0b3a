"""``python -m riverflow``: the CLI."""

import sys

from riverflow.cli import main

sys.exit(main())
