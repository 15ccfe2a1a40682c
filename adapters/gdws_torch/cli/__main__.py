"""``python -m gdws_torch.cli``: the ``gdws`` command."""

from gdws_torch.cli import _console_script

_console_script()
