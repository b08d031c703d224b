"""Test support: model factories, a training harness, a PKI, load drivers and fuzzing strategies.

Not part of the installed packages (nothing under ``protos``, ``compressor``, ``partitioner``,
``runtime``, ``edge_node``, ``cloud_node`` or ``cleave_cli`` may import it; ``tests/test_layers.py``
checks). Tests and benchmarks import it as ``tests.support.<module>`` from the repository root.
"""

from pathlib import Path

#: The repository root (the checkout these tests belong to).
ROOT = Path(__file__).resolve().parents[2]
