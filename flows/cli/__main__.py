"""``python -m flows.cli``: the ``ledit`` command line."""
from flows.cli import main

main()
