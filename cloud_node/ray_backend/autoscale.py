"""Serve's autoscaling on ongoing requests, with the direct lane's requests counted in.

Requests on the direct lane (``ray.transport: direct``) never pass a deployment handle, so the
ongoing-request counts Serve's default policy reads miss them. Each replica reports its lane's
in-flight requests as a custom autoscaling metric (``record_autoscaling_stats``); this policy adds
them, averaged over ``look_back_period_s`` like the rest, to the handles' count and then decides
exactly as Serve's default (``replica_queue_length_autoscaling_policy``): replicas = ongoing requests
/ ``target_ongoing_requests``. Serve applies the bounds and the up/down-scale delays around it.
Imported by the Serve controller by name (``cloud_node.ray_backend.autoscale:ongoing_requests``).
"""

from __future__ import annotations

from typing import Any

#: The custom metric each replica reports: its direct lane's requests in flight.
LANE_METRIC = "lane_ongoing_requests"


def ongoing_requests(ctx: Any) -> tuple[float, dict]:
    """Desired replicas for ``ctx`` (Serve's ``AutoscalingContext``): ongoing requests / target per replica."""
    replicas = ctx.current_num_replicas
    if replicas == 0:
        return ctx.target_num_replicas, {}
    lane = (ctx.aggregated_metrics or {}).get(LANE_METRIC, {})
    ongoing = float(ctx.total_num_requests) + sum(lane.values())
    target = ctx.config.get_target_ongoing_requests() * replicas
    return replicas * ongoing / target, {}
