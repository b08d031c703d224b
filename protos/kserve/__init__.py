"""Third-party wire protocols Cleave also speaks (regenerate with ``make protos``)."""
