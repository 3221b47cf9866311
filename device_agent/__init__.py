"""The board side of edgepack. Light on purpose: numpy, cryptography, zstd and a runtime only.

Nothing here imports ``edgepack`` (the host side); the host imports this package's bundle
reader so that host and board verify with one piece of code.
"""
__version__ = "0.1.0"
