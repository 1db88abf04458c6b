"""Thin command-line layers over library functions."""
