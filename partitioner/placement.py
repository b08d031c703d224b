"""Where a model runs: the one placement type of the library and both daemons.

A plan is :attr:`Placement.SPLIT` (head on the edge, tail in the cloud, at a cut),
:attr:`Placement.CLOUD_ONLY` (the input crosses: the split at cut 0) or :attr:`Placement.EDGE_ONLY`
(nothing crosses). A served request reports where it really ran, which adds
:attr:`Placement.LOCAL_FALLBACK` (meant for the cloud, finished on the edge); no plan has it.

The members are strings (``"split"``, ``"cloud"``, ``"edge"``, ``"local"``), so they serialise to JSON
and label metrics as they are. The wire's ``cleave.v1.Placement`` enum is another type: the servicers
convert, nothing else sees it. :func:`parse_pin` reads the spellings of ``--cut`` and ``plan.cut``.

Torch-free: the light edge and the CLI import it.
"""

from __future__ import annotations

from enum import Enum


class Placement(str, Enum):
    """Where a plan runs a model, or where a request ran."""

    SPLIT = "split"
    CLOUD_ONLY = "cloud"
    EDGE_ONLY = "edge"
    LOCAL_FALLBACK = "local"

    def __str__(self) -> str:
        return self.value

    @property
    def sends(self) -> bool:
        """Whether a plan with this placement sends something to the cloud (needs a session)."""
        return self in (Placement.SPLIT, Placement.CLOUD_ONLY)


#: The spelling of an automatic plan in ``--cut`` and ``plan.cut``; not a placement.
AUTO = "auto"


def parse_pin(text: str | int) -> tuple[Placement, int | str | None]:
    """``(placement, cut)`` from the CLI and YAML spelling of a fixed cut.

    ``"edge"`` is edge-only; ``"cloud"`` and ``0`` (cut 0 is the input) are cloud-only; any other
    index (an int, or a string of digits) or a cut name is a split there. The cut is resolved
    against the model later (:meth:`edge_node.runtime.EdgeRuntime.pin`).

    Raises:
        ValueError: ``"auto"`` (not a fixed placement), an empty or negative cut.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"cut: expected a cut name, an index, 'edge' or 'cloud', got {text!r}")
    if isinstance(text, str):
        text = text.strip()
        if text == AUTO:
            raise ValueError("cut: 'auto' is not a fixed placement (the planner chooses one)")
        if text == Placement.EDGE_ONLY.value:
            return Placement.EDGE_ONLY, None
        if text == Placement.CLOUD_ONLY.value:
            return Placement.CLOUD_ONLY, None
        if not text:
            raise ValueError("cut: empty (give a cut name, an index, 'edge', 'cloud' or 'auto')")
        if not text.isdigit():
            if text.startswith("-") and text[1:].isdigit():
                raise ValueError(f"cut: {text} is negative (cuts are numbered from 0, the input)")
            return Placement.SPLIT, text
        text = int(text)
    if text < 0:
        raise ValueError(f"cut: {text} is negative (cuts are numbered from 0, the input)")
    return (Placement.CLOUD_ONLY, None) if text == 0 else (Placement.SPLIT, text)
