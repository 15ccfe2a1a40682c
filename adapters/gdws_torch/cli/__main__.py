"""``python -m gdws_torch.cli``: the ``gdws`` command."""

import sys

from gdws_torch.cli import main

sys.exit(main())
