"""``python -m dsv3tools`` runs the CLI.

``python -m`` puts the working directory first on ``sys.path``; in a clone of this repository that
directory holds the source folders ``kernels/`` and ``evals/``, which would shadow the PyPI packages of
those names (transformers imports ``kernels``). The installed package needs no path entry for the working
directory, so it moves to the end before anything else is imported.
"""

import os
import sys

_CWD = [p for p in sys.path if p in ("", os.getcwd())]
sys.path[:] = [p for p in sys.path if p not in _CWD] + _CWD

from dsv3tools.cli import main  # noqa: E402

main()
