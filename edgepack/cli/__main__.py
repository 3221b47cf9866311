"""``python -m edgepack.cli``: the same as the ``edgepack`` console script."""
from . import main

main()
