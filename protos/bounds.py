"""Bounds the wire puts on values both sides must agree on: the sender clamps to them, the receiver
refuses what lies outside them (``OpenSessionRequest.plan``, a ``PlanPrediction``)."""

MAX_PREDICTED_MS = 3_600_000.0  # an hour: past that a predicted latency is not one
MAX_PLAN_LABEL = 200  # characters of a plan's label or objective
