"""The torch-free edge's own tests: run in a virtual environment without torch (``make test-edge``)."""
