"""`python -m hf_cachehooks` runs the management CLI."""

import sys

from .cli import main

sys.exit(main())
