"""What the CLI prints: protobuf messages as JSON with numbers as numbers, and readable tables.

``MessageToDict`` follows the proto3 JSON mapping, which writes 64-bit integers as strings and
leaves out fields at their default value; a shell pipeline (``jq '.counters.requests > 0'``)
wants numbers, and every field. :func:`message_dict` gives both.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_dict(message: Message) -> dict[str, Any]:
    """``message`` as a JSON-ready dict: proto field names, every field (defaults too), enums by
    name, and 64-bit integers as numbers rather than the proto3 JSON mapping's strings."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, data)


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            key_field, value_field = kind.fields_by_name["key"], kind.fields_by_name["value"]
            data[field.name] = {_scalar(key_field, k): _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            data[field.name] = [_value(field, v) for v in value]
        else:
            data[field.name] = _value(field, value)
    return data


def _value(field: FieldDescriptor, value: Any) -> Any:
    kind = field.message_type
    if kind is not None:
        # Well-known types (Timestamp, Duration, ...) keep their JSON form.
        return value if kind.full_name.startswith("google.protobuf.") else _numbers(kind, value)
    return _scalar(field, value)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64 and isinstance(value, str):
        return int(value)
    return value


def encoding_text(encoding: Any) -> str:
    """A wire ``TensorEncoding`` in the short form of ``EncodingSpec`` text (int8c, fp16+none...)."""
    from protos.cleave.v1 import tensor_pb2 as t

    if encoding.encoding == t.AFFINE:
        text = f"int{encoding.bits or 8}" + ("c" if encoding.per_channel else "")
        if encoding.clip and encoding.clip != "minmax":
            text += f":{encoding.clip}"
    elif encoding.encoding == t.FP16:
        text = "fp16"
    elif encoding.encoding in (t.JPEG, t.WEBP):
        name = "jpeg" if encoding.encoding == t.JPEG else "webp"
        text = f"{name}{encoding.quality}" if encoding.quality else name
    else:
        text = "fp32"
    if encoding.codec == t.ZSTD:
        text += f"+zstd{encoding.level}" if encoding.level not in (0, 3) else "+zstd"
    elif encoding.codec == t.NONE:
        text += "+none"
    return text


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes} B"


def status_table(status: Any, edge: str) -> str:
    """An edge's ``EdgeStatus`` as a two-column table a person reads at a glance."""
    from protos.cleave.v1 import edge_pb2

    plan = status.plan
    placement = edge_pb2.Placement.Name(plan.placement).replace("PLACEMENT_UNSPECIFIED", "none yet")
    where = f"{placement}"
    if plan.placement == edge_pb2.SPLIT:
        where += f" at {plan.cut_name or '?'} (cut #{plan.cut_index}), features {encoding_text(plan.encoding)}"
    predicted = f"{plan.predicted_ms:.2f} ms, {_mb(plan.predicted_bytes)} up" if plan.predicted_ms else "-"
    if status.auto_plan:
        # The planning thread keeps running and retrying: its error says what it waits for, not that it stopped.
        planner = "automatic" + (f" ({status.planner_error})" if status.planner_error else "")
    else:
        planner = "pinned" + (f" ({status.planner_error})" if status.planner_error else "")
    cloud = f"{status.cloud}  " + (
        "connected" if status.cloud_reachable else f"no session: {status.cloud_error or 'no answer'}"
    )
    link = status.link
    link_text = f"RTT {link.rtt_ms:.2f} ms" if link.rtt_ms else "RTT not measured yet"
    if link.samples:
        # A direction with no sample yet reads 0.0; printed as "0.0 Mbit/s" it looked like a dead link
        # (a pinned split edge's small replies never measure the downlink).
        rates = ", ".join(
            f"{way} {mbps:.1f} Mbit/s" if mbps > 0 else f"{way} not measured yet"
            for way, mbps in (("up", link.up_mbps), ("down", link.down_mbps))
        )
        link_text += f", {rates} ({link.samples} samples)"
    else:
        link_text += ", bandwidth not measured yet (no traffic)"
    c = status.counters
    shape = "x".join(map(str, status.input_shape))
    rows = [
        ("edge", edge),
        ("model", f"{status.model}  input {shape}  fingerprint {status.fingerprint[:16]}"),
        ("backend", status.backend or "-"),
        ("cloud", cloud),
        ("link", link_text),
        ("plan", where),
        ("planner", f"{planner}; reason: {plan.reason or '-'}"),
        ("predicted", predicted),
        ("measured", f"{status.mean_latency_ms:.2f} ms mean (last 50 requests)" if c.requests else "no requests yet"),
        ("queue", str(status.queue_depth)),
        (
            "requests",
            f"{c.requests} total: {c.split} split, {c.edge_only} edge-only, {c.cloud_only} cloud-only, "
            f"{c.fallback} fallback, {c.errors} errors",
        ),
        ("traffic", f"{_mb(c.bytes_up)} up, {_mb(c.bytes_down)} down"),
        (
            "link events",
            f"{c.sessions_opened} sessions opened, {c.reconnects} reconnects, {c.plan_switches} plan switches",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def pools_table(info: Any, cloud: str) -> str:
    """A cloud's tail pools (``GetInfo`` with ``include_pools``): replicas, queue depth, scaling decisions."""
    import time

    lines = [f"cloud {cloud}  tails: {info.backend or 'process'}"]
    lines.append(
        f"  {'model':<20} {'status':<12} {'running':>7} {'states':<24} {'queue':>5} {'requests':>9} {'retries':>7}"
    )
    for pool in info.pools:
        states = ", ".join(f"{k} {v}" for k, v in sorted(pool.replicas.items())) or "-"
        lines.append(
            f"  {pool.model:<20} {pool.status:<12} {pool.running:>7} {states:<24} {pool.queue_depth:>5} "
            f"{pool.requests:>9} {pool.retries:>7}"
        )
        if pool.message:
            lines.append(f"    {pool.message}")
        for d in pool.decisions:
            when = time.strftime("%H:%M:%S", time.localtime(d.unix_time))
            lines.append(f"    {when}  {d.from_replicas} -> {d.to_replicas} replicas  ({d.status}, {d.trigger})")
    return "\n".join(lines)


INPUT_WIDTH = 32  # the widest input name the table shows; a longer one keeps its end, after "..."


def input_names(names: list[str]) -> list[str]:
    """How ``cleave infer`` names each input in its table: the file's base name when base names tell
    the inputs apart (photos passed by absolute path), else the name as given; a name wider than
    :data:`INPUT_WIDTH` keeps its end (the file name) after ``...``."""
    base = [os.path.basename(n) or n for n in names]
    shown = base if len(set(base)) == len(base) else names
    return [n if len(n) <= INPUT_WIDTH else "..." + n[-(INPUT_WIDTH - 3) :] for n in shown]


def infer_table(records: list[dict[str, Any]], stages: list[tuple[str, str]]) -> str:
    """``cleave infer``'s records as a table: input, where it ran, top-1 class, each stage's ms,
    bytes sent up, and the class name and the edge's note when there are any."""
    names = input_names([r["input"] for r in records])
    width = max([len("input"), *map(len, names)])
    lines = [
        f"{'input':<{width}} {'where':<15} {'top-1':>6} "
        + " ".join(f"{label:>7}" for _, label in stages)
        + f" {'bytes up':>9}"
    ]
    for name, r in zip(names, records, strict=True):
        t = r["timing_ms"]
        lines.append(
            f"{name:<{width}} {r['placement']:<15} {r['top'][0]['class']:>6} "
            + " ".join(f"{t[key]:>7.2f}" for key, _ in stages)
            + f" {r['bytes_up']:>9}"
            + (f"  {r['top'][0]['label']}" if r["top"][0].get("label") else "")
            + (f"  ({r['note']})" if r["note"] else "")
        )
    return "\n".join(lines)
