"""``python -m safeinfer_integrations.cli``: the ``safeinfer`` command."""

import sys

from . import main

sys.exit(main())
