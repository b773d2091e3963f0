"""``python -m refflow.cli``: the same as the ``refflow`` command."""
import sys

from refflow.cli import main

sys.exit(main())
