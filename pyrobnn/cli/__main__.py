"""``python -m pyrobnn.cli`` (what ``torchrun ... -m pyrobnn.cli`` runs): the ``pyrobnn`` command."""
import sys

from . import main

sys.exit(main())
