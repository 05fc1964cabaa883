"""``python -m saap``: the ``saap`` command."""

import sys

from saap.pipeline.cli import main

sys.exit(main())
