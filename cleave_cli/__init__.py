"""The ``cleave`` command-line client, the demo, and small client helpers for apps and tests."""
