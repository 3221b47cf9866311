"""edgepack: quantize a model for a named board, package it, ship it to a fleet, watch it."""
__version__ = "0.1.0"
