"""`python -m peftkit ...` (and `torchrun ... -m peftkit train ...`) = the `peftkit` command."""

import os
import sys

from peftkit.cli import main

code = main()
if "LOCAL_RANK" in os.environ:
    # A torchrun rank has written and flushed everything and left the process group; the
    # interpreter's teardown can still hang on, or abort in, the threads gloo and DDP leave
    # behind ("terminate called without an active exception"; a rank that never exits), so a
    # rank ends here, as soon as its output is out.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
