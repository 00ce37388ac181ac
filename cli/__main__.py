"""`python -m edit_mobile.cli COMMAND ...`: the same as `edit-mobile COMMAND ...` (for accelerate / torchrun)."""

import sys

from .main import main

sys.exit(main())
