"""`python -m d2lft` runs the command line."""
import sys

from d2lft.cli import main

sys.exit(main())
