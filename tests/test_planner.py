"""The latency model and planner on synthetic profiles: optimum found, budgets kept, no flapping."""

from __future__ import annotations

import pytest

from partitioner.costmodel import CLOUD_ONLY, EDGE_ONLY, SPLIT, CostModel, CutCost, Link
from partitioner.planner import UNMEASURED, Budgets, Distortion, Planner, SwitchPolicy
from partitioner.profile import LatencyCurve, Profile

ENCODINGS = ("raw", "fp16", "int8", "int4", "int2", "raw+none")
BYTES_PER_ELEMENT = {"raw": 3.0, "fp16": 2.0, "int8": 0.8, "int4": 0.4, "int2": 0.2, "raw+none": 4.0}


def synthetic_cost(edge_slowdown: float = 4.0) -> CostModel:
    """A 5-layer chain: features shrink 4x per layer; the cloud is ``edge_slowdown`` times faster."""
    layer_ms = [2.0, 3.0, 3.0, 2.0, 1.0]  # cloud time per layer
    elements = [150_000, 300_000, 60_000, 8_000, 2_000, 100]  # input, then after each layer
    cuts = []
    for index, numel in enumerate(elements[:-1]):
        done = sum(layer_ms[:index])
        cut = CutCost(
            index=index,
            name="input" if index == 0 else f"layer{index}",
            edge_ms=done * edge_slowdown,
            cloud_ms=sum(layer_ms) - done,
            raw_bytes=numel * 4,
            edge_memory=(index + 1) * 1_000_000,
        )
        for enc in ("int8c", "jpeg", "webp", "raw+none") if index == 0 else ENCODINGS:
            per = {"int8c": 1.0, "jpeg": 0.5, "webp": 0.4}.get(enc, BYTES_PER_ELEMENT.get(enc))
            cut.feature_bytes[enc] = int(numel * per)
            cut.encode_ms[enc] = 0.5
            cut.decode_ms[enc] = 0.2
        cuts.append(cut)
    return CostModel(
        "chain", cuts, edge_total_ms=sum(layer_ms) * edge_slowdown, edge_model_memory=6_000_000, output_bytes=400
    )


def brute_force(cost: CostModel, link: Link, allowed=lambda c: True) -> float:
    return min(c.predict(link).total_ms for c in cost.candidates() if allowed(c))


@pytest.mark.parametrize("mbps", [0.5, 1, 5, 20, 100, 1000])
@pytest.mark.parametrize("rtt", [1.0, 50.0])
def test_best_plan_is_the_true_optimum(mbps: float, rtt: float) -> None:
    cost = synthetic_cost()
    link = Link(mbps, mbps, rtt)
    best = Planner(cost).best(link)
    assert best.cost_ms == pytest.approx(brute_force(cost, link))
    assert best.predicted.total_ms == pytest.approx(best.cost_ms)


def test_placement_follows_the_link() -> None:
    planner = Planner(synthetic_cost())
    assert planner.best(Link(0.1, 0.1, 100)).candidate.kind == EDGE_ONLY
    assert planner.best(Link(1000, 1000, 0.5)).candidate.kind == CLOUD_ONLY
    kinds = [planner.best(Link(mbps, mbps, 2)).candidate.kind for mbps in (0.5, 2, 5, 10, 20, 50, 100, 1000)]
    assert SPLIT in kinds  # in between, cutting inside the model wins
    # ... and the choice moves monotonically: edge-only, then splits, then cloud-only.
    order = {EDGE_ONLY: 0, SPLIT: 1, CLOUD_ONLY: 2}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)


def test_latency_formula_adds_up() -> None:
    cost = synthetic_cost()
    cand = next(c for c in cost.candidates() if c.cut_index == 2 and c.encoding == "int4")
    b = cand.predict(Link(8, 16, 20))
    assert b.upload_ms == pytest.approx(cand.bytes_up * 8 / 8e6 * 1e3)
    assert b.download_ms == pytest.approx(cand.bytes_down * 8 / 16e6 * 1e3)
    assert b.total_ms == pytest.approx(cand.edge_ms + 0.5 + b.upload_ms + 20 + 0.2 + cand.cloud_ms + b.download_ms)
    assert b.bottleneck_ms == pytest.approx(max(cand.edge_ms + 0.5, b.upload_ms, 0.2 + cand.cloud_ms))


def test_memory_budget_is_respected() -> None:
    cost = synthetic_cost()
    link = Link(5, 5, 10)
    free = Planner(cost).best(link).candidate
    assert free.edge_memory > 2_500_000  # the unconstrained optimum needs more than the budget below
    tight = Planner(cost, Budgets(memory_bytes=2_500_000)).best(link)
    assert tight.candidate.edge_memory <= 2_500_000 or tight.candidate.kind == CLOUD_ONLY
    assert tight.cost_ms == pytest.approx(
        brute_force(cost, link, lambda c: c.kind == CLOUD_ONLY or c.edge_memory <= 2_500_000)
    )


def test_accuracy_budget_is_respected_and_checked_lazily() -> None:
    cost = synthetic_cost()
    seen = []

    def distortion(c):
        seen.append((c.cut_index, c.encoding))
        bits = {"int2": 2, "int4": 4, "int8": 8, "jpeg": 3, "webp": 3, "int8c": 8}.get(c.encoding, 16)
        return Distortion(rel_error=2.0**-bits, top1=1.0 if bits >= 4 else 0.5)

    # A link where, with accuracy free, a lossy low-bit encoding wins.
    link = next(
        Link(m, m, 2)
        for m in (1, 2, 5, 10, 20, 50)
        if Planner(cost).best(Link(m, m, 2)).candidate.encoding in ("int2", "jpeg", "webp")
    )
    planner = Planner(cost, Budgets(max_rel_error=0.1, min_top1=0.99), distortion)
    best = planner.best(link)
    assert best.candidate.encoding not in ("int2", "jpeg", "webp")
    if best.candidate.kind != EDGE_ONLY:
        assert best.distortion.rel_error <= 0.1 and best.distortion.top1 >= 0.99
    allowed = {"raw", "raw+none", "fp16", "int8", "int8c", "int4", ""}
    assert best.cost_ms == pytest.approx(brute_force(cost, link, lambda c: c.encoding in allowed))
    assert len(seen) < len(planner.candidates) / 2  # only candidates that could win were measured


def test_a_walk_past_its_deadline_plans_on_what_is_known_and_the_next_one_goes_on() -> None:
    """On a slow device every accuracy measurement takes seconds: a re-plan with a deadline ends on the
    cheapest candidate already known to fit, and later walks measure what it passed over."""
    cost = synthetic_cost()
    link = Link(5, 5, 2)
    seen = []

    def distortion(c):
        seen.append((c.cut_index, c.encoding))
        return Distortion(rel_error=0.0, top1=1.0)  # every candidate fits: only the deadline holds the walk back

    budgets = Budgets(max_rel_error=0.1, min_top1=0.99)
    unhurried = Planner(cost, budgets, lambda c: Distortion(0.0, 1.0)).best(link)
    assert unhurried.candidate.encoding not in (
        "raw",
        "raw+none",
        "int8c",
        "",
    )  # the best is lossy: it must be measured

    planner = Planner(cost, budgets, distortion)
    hurried = planner.best(link, deadline=0.0)  # long past: measure nothing
    assert seen == [] and not planner.walk_complete
    assert planner.lossless(hurried.candidate) and hurried.cost_ms > unhurried.cost_ms
    passed = [s for s in planner.rank(link, deadline=0.0) if s.rejected == UNMEASURED]
    assert passed and all(not planner.lossless(s.candidate) for s in passed)

    planner.best(link)  # no deadline: the walk measures what it needs
    assert planner.walk_complete and seen
    measured = len(seen)
    again = planner.best(link, deadline=0.0)  # what is measured is known: past the deadline, still the best
    assert again.candidate == unhurried.candidate and len(seen) == measured and planner.walk_complete


def test_webp_input_is_a_cloud_only_candidate_judged_by_top1_agreement() -> None:
    """WebP of the input wins a slow link when its top-1 agreement is within the budget, and is
    rejected with its agreement named when it is not."""
    cost = synthetic_cost()
    link = Link(0.5, 0.5, 2)
    lossy = lambda top1: lambda c: Distortion(rel_error=0.0, top1=top1 if c.encoding == "webp" else 1.0)  # noqa: E731
    free = Planner(cost, Budgets(min_top1=0.99), lossy(1.0)).rank(link)
    webp = next(s for s in free if s.candidate.encoding == "webp")
    assert webp.candidate.kind == CLOUD_ONLY and webp.candidate.cut_index == 0
    assert webp.cost_ms < next(s for s in free if s.candidate.encoding == "jpeg").cost_ms  # fewer bytes
    strict = Planner(cost, Budgets(min_top1=0.99), lossy(0.9))
    rejected = next(s for s in strict.rank(link) if s.candidate.encoding == "webp")
    assert rejected.rejected and "top-1" in rejected.rejected
    assert strict.best(link).candidate.encoding != "webp"


def test_8_bit_images_cost_no_accuracy_when_sent_as_8_bit_codes() -> None:
    cost = synthetic_cost()
    harsh = lambda c: Distortion(rel_error=1.0, top1=0.0)  # noqa: E731 - every lossy candidate fails
    link = Link(1000, 1000, 0.5)  # fast: cloud-only wins if it is allowed
    image_input = Planner(cost, Budgets(max_rel_error=0.05), harsh).best(link)
    assert image_input.candidate.kind == CLOUD_ONLY and image_input.candidate.encoding in ("int8c", "raw+none")
    assert (
        Planner(cost, Budgets(max_rel_error=0.05), harsh, input_is_8bit=False).best(link).candidate.encoding != "int8c"
    )


def test_throughput_objective_minimises_the_slowest_stage() -> None:
    cost = synthetic_cost()
    link = Link(20, 20, 40)
    best = Planner(cost, objective="throughput").best(link)
    assert best.cost_ms == pytest.approx(min(c.predict(link).bottleneck_ms for c in cost.candidates()))
    assert best.cost_ms <= Planner(cost).best(link).predicted.bottleneck_ms
    with pytest.raises(ValueError, match="objective"):
        Planner(cost, objective="fastest")


def test_baselines() -> None:
    planner = Planner(synthetic_cost())
    link = Link(5, 5, 10)
    assert planner.baseline("edge-only", link).candidate.kind == EDGE_ONLY
    raw = planner.baseline("cloud-raw", link).candidate
    assert raw.kind == CLOUD_ONLY and raw.encoding == "int8c"
    assert planner.baseline("cloud-jpeg", link).candidate.encoding == "jpeg"
    assert planner.baseline("cloud-webp", link).candidate.encoding == "webp"
    neuro = planner.baseline("neurosurgeon", link)
    assert neuro.candidate.kind == EDGE_ONLY or neuro.candidate.encoding == "raw+none"
    assert planner.best(link).cost_ms <= min(
        planner.baseline(b, link).cost_ms
        for b in ("edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp", "neurosurgeon")
    )
    with pytest.raises(ValueError, match="baseline"):
        planner.baseline("magic", link)


def test_switch_policy_needs_a_clear_and_confirmed_gain() -> None:
    planner = Planner(synthetic_cost())
    slow, fast = Link(1, 1, 10), Link(200, 200, 1)
    current = planner.best(slow).candidate
    policy = SwitchPolicy(min_gain=0.1, min_gain_ms=2.0, confirmations=2)
    assert not policy.should_switch(planner, current, planner.best(slow), slow)  # same plan
    # A link that flips back and forth every check never confirms a switch: no flapping.
    flips = [fast, slow] * 4
    assert not any(policy.should_switch(planner, current, planner.best(link), link) for link in flips)
    assert not policy.should_switch(planner, current, planner.best(fast), fast)
    assert policy.should_switch(planner, current, planner.best(fast), fast)  # confirmed
    # A marginally better plan (within the hysteresis band) never replaces the current one.
    nearly = Link(1.02, 1.02, 10)
    policy = SwitchPolicy(min_gain=0.1, min_gain_ms=2.0, confirmations=1)
    assert not policy.should_switch(planner, current, planner.best(nearly), nearly)


def test_latency_curve_is_anchored_on_measured_heads() -> None:
    # Per-node times overestimate by 50% (interpreter overhead); measured heads say the truth.
    node_ms = [0.0] + [3.0] * 10
    true_head = {i: 2.0 * i for i in range(0, 11, 5)}
    profile = Profile("m", "f", "h", "t", 1, 1, [f"n{i}" for i in range(11)], node_ms, [0] * 11, true_head, 20.0)
    curve = LatencyCurve(profile)
    assert curve.head_ms(5) == pytest.approx(10.0)
    assert curve.head_ms(3) == pytest.approx(6.0)  # interpolated between anchors, not 9.0
    assert curve.tail_ms(3) == pytest.approx(14.0)
    assert all(curve.head_ms(i) <= curve.head_ms(i + 1) for i in range(10))


def test_a_head_of_every_node_costs_what_the_whole_model_costs() -> None:
    # Noisy anchors (as on a throttled device): the last head was timed faster than the whole model.
    profile = Profile("m", "f", "h", "t", 1, 1, ["x", "a", "b"], [0.0, 5.0, 5.0], [0] * 3, {0: 0.0, 2: 7.0}, 12.0)
    curve = LatencyCurve(profile)
    assert curve.head_ms(2) == pytest.approx(12.0) and curve.tail_ms(2) == 0.0


def test_cloud_timings_from_replies_rescale_the_cloud_profile() -> None:
    planner = Planner(synthetic_cost())
    link = Link(20, 20, 5.0)
    split = next(c for c in planner.candidates if c.kind == SPLIT and c.cut_index == 2 and c.encoding == "int8")
    edge_only = next(c for c in planner.candidates if c.kind == EDGE_ONLY)
    before = planner.score(split, link).predicted
    planner.observe_cloud(2, split.cloud_ms * 3)
    planner.observe_cloud(2, split.cloud_ms * 3)
    assert planner.cloud_scale == 1.0  # two replies are not enough to override a profile
    planner.observe_cloud(2, split.cloud_ms * 3)
    assert planner.cloud_scale == pytest.approx(3.0)
    after = planner.score(split, link).predicted
    assert after.cloud_ms == pytest.approx(3 * before.cloud_ms)
    assert after.total_ms - before.total_ms == pytest.approx(2 * before.cloud_ms)
    # Every cut's tail is rescaled (the whole host is slower), edge-only not at all.
    cloud_only = next(c for c in planner.candidates if c.kind == CLOUD_ONLY)
    assert planner.score(cloud_only, link).predicted.cloud_ms == pytest.approx(3 * cloud_only.cloud_ms)
    assert planner.score(edge_only, link).cost_ms == edge_only.predict(link).total_ms
    for _ in range(20):
        planner.observe_cloud(2, split.cloud_ms * 1000)  # absurd timings are clamped
    assert planner.cloud_scale == 10.0


def test_bytes_sent_correct_only_the_candidate_that_sent_them() -> None:
    planner = Planner(synthetic_cost())
    link = Link(5, 5, 5.0)
    cloud_only = next(c for c in planner.candidates if c.kind == CLOUD_ONLY)
    split = next(c for c in planner.candidates if c.kind == SPLIT and c.cut_index == 2 and c.encoding == "int8")
    before = planner.score(cloud_only, link).predicted
    for _ in range(2):
        planner.observe_bytes(cloud_only, cloud_only.bytes_up // 2)
    assert planner.score(cloud_only, link).predicted == before  # two requests do not override calibration
    planner.observe_bytes(cloud_only, cloud_only.bytes_up // 2)
    after = planner.score(cloud_only, link).predicted
    assert after.upload_ms == pytest.approx(before.upload_ms / 2, rel=1e-3)
    assert after.total_ms == pytest.approx(before.total_ms - before.upload_ms / 2, rel=1e-3)
    # The app's inputs say nothing about another cut's features.
    assert planner.score(split, link).predicted == split.predict(link)
    planner.observe_bytes(next(c for c in planner.candidates if c.kind == EDGE_ONLY), 10**6)  # ignored
    assert planner.byte_scale(cloud_only) == pytest.approx(0.5, rel=1e-3)


def test_a_slower_cloud_moves_the_plan_towards_the_edge() -> None:
    planner = Planner(synthetic_cost(edge_slowdown=2.0))
    link = Link(100, 100, 1.0)
    fast = planner.best(link)
    assert fast.candidate.kind != EDGE_ONLY
    for _ in range(3):
        planner.observe_cloud(fast.candidate.cut_index, fast.candidate.cloud_ms * 10)
    assert planner.best(link).candidate.kind == EDGE_ONLY


def test_quantized_heads_enter_the_search_over_cuts() -> None:
    cost = synthetic_cost(edge_slowdown=4.0)
    for cut in cost.cuts:
        cut.weight_bytes = cut.index * 400_000
    quantized = cost.with_quantized_heads({1: 2.0, 3: 4.0})
    by_index = {c.index: c for c in quantized.cuts}
    original = {c.index: c for c in cost.cuts}
    assert by_index[0] == original[0]  # cloud-only has no head
    assert by_index[1].edge_ms == pytest.approx(original[1].edge_ms / 2.0)
    assert by_index[2].edge_ms == pytest.approx(original[2].edge_ms / 3.0)  # interpolated between cuts 1 and 3
    assert by_index[4].edge_ms == pytest.approx(original[4].edge_ms / 4.0)  # beyond the last: nearest
    assert by_index[3].edge_memory == original[3].edge_memory - 900_000  # 1.2 MB of float weights -> 0.3 MB
    assert quantized.edge_total_ms == cost.edge_total_ms  # edge-only runs the float model
    # A faster head makes later cuts worth it: the plan moves towards the edge on a slow link.
    link = Link(2, 2, 20.0)
    assert Planner(quantized).best(link).candidate.cut_index > Planner(cost).best(link).candidate.cut_index
    with pytest.raises(ValueError, match="speedups"):
        cost.with_quantized_heads({})


def test_edge_timings_from_requests_rescale_every_head_and_edge_only() -> None:
    planner = Planner(synthetic_cost())
    link = Link(20, 20, 5.0)
    split = next(c for c in planner.candidates if c.kind == SPLIT and c.cut_index == 2 and c.encoding == "int8")
    edge_only = next(c for c in planner.candidates if c.kind == EDGE_ONLY)
    cloud_only = next(c for c in planner.candidates if c.kind == CLOUD_ONLY)
    for _ in range(2):
        planner.observe_edge(-1, edge_only.edge_ms * 1.5)
    assert planner.score(edge_only, link).cost_ms == edge_only.predict(link).total_ms  # two are not enough
    planner.observe_edge(-1, edge_only.edge_ms * 1.5)
    assert planner.score(edge_only, link).cost_ms == pytest.approx(1.5 * edge_only.edge_ms)
    # The device is slower at every cut, not only where it was measured; the cloud's share is untouched.
    after = planner.score(split, link).predicted
    assert after.edge_ms == pytest.approx(1.5 * split.edge_ms)
    assert after.cloud_ms == split.cloud_ms and after.upload_ms == split.predict(link).upload_ms
    assert planner.score(cloud_only, link).predicted == cloud_only.predict(link)  # no head, nothing to scale
    planner.observe_edge(2, 0.0)  # nothing measured: ignored
    assert planner.edge_scale == pytest.approx(1.5)


def test_a_tiny_head_served_at_full_speed_does_not_rescale_the_others() -> None:
    # Under a CPU quota a head of 0.5% of the model runs whole in the period's share, at full speed: a third of
    # its sustained (predicted) cost. That says nothing of the bigger heads, which the quota throttles.
    cost = synthetic_cost()
    cost.cuts[1].edge_ms = 0.005 * cost.edge_total_ms
    planner = Planner(cost)
    for _ in range(5):
        planner.observe_edge(1, cost.cuts[1].edge_ms / 3)
    assert planner.edge_scale == 1.0
    for _ in range(3):  # a head of nearly half the model does
        planner.observe_edge(2, cost.cuts[2].edge_ms * 1.2)
    assert planner.edge_scale == pytest.approx(1.2)


def test_served_heads_correct_the_profiles_shape_cut_by_cut() -> None:
    """Under a CPU quota the heads up to the middle of EfficientNet-Lite0 served in 0.67-0.8x their profile while
    the late heads and the whole model took 0.9-1.26x (placement_real.json). One scale for every cut, the median
    of the cuts served last, then ranked a late cut over a middle one that was 1.3x faster. Each cut served often
    enough is a point of the corrected E(k); between them it is interpolated, beyond them their ratio holds."""
    cost = synthetic_cost()  # heads: cut 1 8 ms, 2 20, 3 32, 4 40; the whole model 44

    def served(x: float) -> float:  # the device: 0.7x its profile up to cut 2, rising to 1.0x at cut 4
        return 0.7 * x if x <= 20 else 14 + (x - 20) * 26 / 20 if x <= 40 else x

    planner = Planner(cost)
    for cut, x in ((2, 20.0), (4, 40.0), (-1, 44.0)):
        for _ in range(3):
            planner.observe_edge(cut, served(x))
    assert planner.edge_scale == pytest.approx(1.0)  # the last nine: six at 1.0, three at 0.7
    link = Link(3, 3, 5.0)
    by_cut = {c.cut_index: c for c in planner.candidates if c.kind == SPLIT and c.encoding == "int8"}
    assert planner.score(by_cut[2], link).predicted.edge_ms == pytest.approx(14.0)
    assert planner.score(by_cut[3], link).predicted.edge_ms == pytest.approx(served(32.0))  # interpolated
    assert planner.score(by_cut[1], link).predicted.edge_ms == pytest.approx(0.7 * 8)  # the first point's ratio
    edge_only = next(c for c in planner.candidates if c.kind == EDGE_ONLY)
    assert planner.score(edge_only, link).predicted.edge_ms == pytest.approx(44.0)
    # The plan is the one the served times favour (one scale, 1.0, kept edge-only here).
    truth = min(planner.candidates, key=lambda c: c.predict(link).total_ms - c.edge_ms + served(c.edge_ms))
    assert planner.best(link).candidate == truth and truth.kind == SPLIT

    # Served only at one cut, the correction is that cut's ratio everywhere, as the one scale was.
    single = Planner(cost)
    for _ in range(3):
        single.observe_edge(2, 30.0)
    assert single.score(by_cut[4], link).predicted.edge_ms == pytest.approx(60.0)
    # A cut not served for EDGE_MEMORY observations no longer shapes the curve.
    single.EDGE_MEMORY = 6
    for _ in range(6):
        single.observe_edge(4, 40.0)
    assert single.score(by_cut[2], link).predicted.edge_ms == pytest.approx(20.0)


def test_a_per_request_overhead_counts_against_every_placement_that_sends() -> None:
    cost = synthetic_cost()
    planner = Planner(cost)
    plain, slow = Link(50, 50, 2.0), Link(50, 50, 2.0, overhead_ms=30.0)
    edge_only = next(c for c in planner.candidates if c.kind == EDGE_ONLY)
    for c in planner.candidates:
        extra = 0.0 if c.kind == EDGE_ONLY else 30.0
        assert c.predict(slow).total_ms == pytest.approx(c.predict(plain).total_ms + extra)
    # Without the overhead a split wins; paying 30 ms a request, the device keeps everything.
    assert planner.best(plain).candidate.kind != EDGE_ONLY
    assert planner.best(slow).candidate == edge_only
    with pytest.raises(ValueError, match="overhead"):
        Link(1, 1, 1, overhead_ms=-1.0)


def test_noisy_head_anchors_do_not_flatten_the_tails_after_them() -> None:
    # Five equal nodes; the head at node 2 was timed high (30 ms where the others say ~20-25).
    anchors = {1: 10.0, 2: 30.0, 3: 20.0, 4: 30.0}
    profile = Profile("m", "f", "h", "t", 1, 1, list("abcdef"), [0.0] + [10.0] * 5, [0] * 6, anchors, 50.0)
    curve = LatencyCurve(profile)
    heads = [curve.head_ms(i) for i in range(6)]
    assert heads == sorted(heads)  # still monotone
    # The outlier is pooled with the low anchor after it (least squares), not carried forward to node 4.
    assert curve.head_ms(2) == pytest.approx(25.0) and curve.head_ms(3) == pytest.approx(25.0)
    assert curve.head_ms(4) == pytest.approx(30.0) and curve.tail_ms(3) > curve.tail_ms(4)
