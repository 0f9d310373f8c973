"""`python -m onnxcomp`: the same as the `onnxcomp` command."""

import sys

from .cli import main

sys.exit(main())
