"""Developer tools, run from the checkout as modules: ``python -m tools.demo``, ``python -m tools.workflows``, ..."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
