"""``python -m omninft_fast`` runs the ``omninft-fast`` command line."""

import sys

from omninft_fast.cli import main

sys.exit(main())
