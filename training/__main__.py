"""``python -m training distill|joint|finetune|eval ...`` (same as ``rwkvsam train ...`` / ``rwkvsam eval``)."""

import sys

from .cli import main

sys.exit(main())
