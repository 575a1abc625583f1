"""`python -m qwen_edge.cli`: the `qwen-edge` console command."""

import sys

from . import main

sys.exit(main())
