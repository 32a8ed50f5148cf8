"""Quantization: integer-exact simulation of edge runtimes (see intsim.py)."""
