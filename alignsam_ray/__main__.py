"""`python -m alignsam_ray ...` is the `alignsam` command."""
import sys

from .cli import main

sys.exit(main())
