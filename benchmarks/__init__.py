"""Benchmarks: scripts that measure Cleave and write JSON and plots under ``benchmarks/results/``.

Not tests and not installed. Run each as a module from the repository root, so that it imports the
packages of this checkout (``python -m benchmarks.codec``, ``python -m benchmarks.overhead``, ...).
"""
