"""``python -m pqueue.cli``: the same as the ``pq`` command."""

import sys

from pqueue.cli import main

sys.exit(main())
