"""`python -m peftkit ...` (and `torchrun ... -m peftkit train ...`) = the `peftkit` command."""

import sys

from peftkit.cli import main

sys.exit(main())
