"""Where each slice of the model runs: an exact bottleneck-minimising partitioner.

Pure functions, no I/O, so the gateway can re-plan on every membership change and the
benchmark can call the same code millions of times.

Cost model (one frame in flight per stage; CPU and network interface work in parallel, so a
stage's throughput is limited by the slower of the two):

* compute of a stage = sum of its blocks' latencies measured *on its device*, plus, for the stage
  that starts at block 0, that device's cost of decoding one camera frame (``Problem.decode_s``:
  a 12 MP JPEG costs more than the whole model, and only the device running stage 1 pays it);
* transfer out of a stage = bytes of its last block's output / bandwidth of the link from its
  device to the next stage's device; the last stage sends its output to the ``GATEWAY``;
* the frame upload = ``frame_bytes`` / bandwidth of the link from the ``CAMERA`` to stage 1;
* a link's bandwidth is the *sending* endpoint's uplink (``Device.bandwidth_bps``, or
  ``PlacementProblem.camera_bandwidth_bps``) unless ``PlacementProblem.links`` gives that
  (sender, receiver) pair;
* memory of a stage = its blocks' parameter bytes + the largest peak activation of its blocks,
  and must not exceed the device's cap.

bottleneck = max(frame upload, every stage's compute, every stage's transfer out); the frame
rate the pipeline sustains is 1 / bottleneck.

A dedicated *ingest* device (:func:`plan_with_ingest`) may take the decode off stage 1: it runs no
block, its compute is its own decode, the frame is uploaded to it, and it sends stage 1 the
model-sized input (``input_bytes``) over its link; no stage then decodes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from shared.profiling import CAMERA, GATEWAY, MB, BlockProfile
from shared.schemas import Placement, StageAssignment

# DP table cells (states x types x (blocks + 1)) kept at most: ~240 MB, and at most
# cells x (blocks + 1) min-max steps, seconds of numpy.
MAX_DP_CELLS = 20_000_000


class InfeasiblePlacement(ValueError):
    """No assignment of slices to devices respects the memory caps (the message says what does not fit)."""


@dataclass(frozen=True)
class Block:
    """The device-independent cost of one model block."""

    name: str
    param_bytes: int
    activation_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class Device:
    id: str
    memory_bytes: int
    bandwidth_bps: float  # uplink, bytes/s: what everything this device sends travels at by default


@dataclass(frozen=True)
class PlacementProblem:
    """Everything the planner needs; validated on construction so solvers can trust it."""

    blocks: tuple[Block, ...]
    devices: tuple[Device, ...]
    compute_s: Mapping[str, Sequence[float]]  # device id -> seconds per block, on that device
    frame_bytes: int
    camera_bandwidth_bps: float
    links: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (sender, receiver) -> bytes/s
    decode_s: Mapping[str, float] = field(default_factory=dict)  # device id -> seconds to decode one frame

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("the model has no blocks")
        if not self.devices:
            raise ValueError("no devices to place the model on")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"device ids must be unique: {ids}")
        if {CAMERA, GATEWAY} & set(ids):
            raise ValueError(f"'{CAMERA}' and '{GATEWAY}' are reserved link endpoints, not device ids")
        for device in self.devices:
            if device.memory_bytes <= 0 or not device.bandwidth_bps > 0:
                raise ValueError(f"device {device.id}: memory and bandwidth must be positive")
            times = self.compute_s.get(device.id)
            if times is None:
                raise ValueError(f"no compute times for device {device.id}")
            if len(times) != len(self.blocks):
                raise ValueError(f"device {device.id} has {len(times)} compute times for {len(self.blocks)} blocks")
            if not all(math.isfinite(t) and t >= 0 for t in times):
                raise ValueError(f"device {device.id}: compute times must be finite and >= 0")
        for device, seconds in self.decode_s.items():
            if device not in ids or not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"decode time of {device}: must be a device's, finite and >= 0")
        if self.frame_bytes < 0 or not self.camera_bandwidth_bps > 0:
            raise ValueError("frame_bytes must be >= 0 and camera_bandwidth_bps > 0")
        for (sender, receiver), bandwidth in self.links.items():
            if sender == receiver:
                raise ValueError(f"link {sender}->{receiver}: a link joins two different endpoints (a device "
                                 f"never sends to itself: consecutive blocks on one device share memory)")
            if sender not in ids + [CAMERA] or receiver not in ids + [GATEWAY]:
                raise ValueError(f"link {sender}->{receiver}: unknown endpoint (devices, '{CAMERA}' as "
                                 f"sender, '{GATEWAY}' as receiver)")
            if not bandwidth > 0:
                raise ValueError(f"link {sender}->{receiver}: bandwidth must be positive")

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def bandwidth(self, sender: str, receiver: str) -> float:
        default = self.camera_bandwidth_bps if sender == CAMERA else self._device[sender].bandwidth_bps
        return self.links.get((sender, receiver), default)

    def bandwidth_to_any(self, sender: str, receivers: Iterable[str]) -> float:
        """``min(bandwidth(sender, r) for r in receivers)``: the uplink itself unless ``sender`` has a link of its
        own (the hybrid planner asks this for every replica and every plan it weighs)."""
        if sender not in self._linked_senders:
            return self.camera_bandwidth_bps if sender == CAMERA else self._device[sender].bandwidth_bps
        return min(self.bandwidth(sender, r) for r in receivers)

    def bytes_into(self, start: int) -> int:
        """Bytes a stage starting at block ``start`` receives (the frame for block 0)."""
        return self.frame_bytes if start == 0 else self.blocks[start - 1].output_bytes

    def compute(self, device: str, start: int, end: int) -> float:
        """Seconds for blocks ``start..end-1`` on ``device`` (prefix sums, so every solver agrees exactly),
        with the frame's decode when the stage starts at block 0."""
        prefix = self._compute_prefix[device]
        return float(prefix[end] - prefix[start]) + (self.decode_s.get(device, 0.0) if start == 0 else 0.0)

    def memory(self, start: int, end: int) -> int:
        return int(self._param_prefix[end] - self._param_prefix[start]) + max(
            b.activation_bytes for b in self.blocks[start:end])

    def fits(self, device: str, start: int, end: int) -> bool:
        """Blocks ``start..end-1`` fit ``device``'s memory."""
        return self.memory(start, end) <= self._device[device].memory_bytes

    @cached_property
    def _device(self) -> dict[str, Device]:
        return {d.id: d for d in self.devices}

    @cached_property
    def _linked_senders(self) -> frozenset[str]:
        return frozenset(sender for sender, _ in self.links)

    @cached_property
    def _compute_prefix(self) -> dict[str, np.ndarray]:
        return {d: np.concatenate([[0.0], np.cumsum(np.asarray(t, dtype=np.float64))])
                for d, t in self.compute_s.items()}

    @cached_property
    def _peak_activation(self) -> np.ndarray:
        """[i, j] = the largest activation among blocks i..j-1 (0 when j <= i)."""
        activations = np.array([b.activation_bytes for b in self.blocks], dtype=np.int64)
        peak = np.zeros((self.n_blocks + 1, self.n_blocks + 1), dtype=np.int64)
        for i in range(self.n_blocks):
            peak[i, i + 1:] = np.maximum.accumulate(activations[i:])
        return peak

    @cached_property
    def _incoming(self) -> np.ndarray:
        """[i] = ``bytes_into(i)`` for i = 0..n_blocks."""
        return np.array([self.bytes_into(i) for i in range(self.n_blocks + 1)], dtype=np.float64)

    @cached_property
    def _stage_costs(self) -> dict[str, np.ndarray]:
        """Filled by ``_stage_cost_matrix``: the heuristic asks for each device's matrix many times."""
        return {}

    @cached_property
    def _param_prefix(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([b.param_bytes for b in self.blocks], dtype=np.int64)])


@dataclass(frozen=True)
class Stage:
    device: str
    first_block: int
    last_block: int  # inclusive, as in shared.schemas.StageAssignment
    compute_s: float
    transfer_s: float  # its output to the next stage (the last stage: to the gateway)
    memory_bytes: int


@dataclass(frozen=True)
class IngestStage:
    """A device that only decodes camera frames and sends stage 1 the model-sized input."""

    device: str
    decode_s: float
    transfer_s: float  # the model-sized input to stage 1's device


@dataclass(frozen=True)
class Plan:
    bottleneck_s: float
    frame_upload_s: float  # to stage 1, or to the ingest device when there is one
    stages: tuple[Stage, ...]
    exact: bool = True  # False: a heuristic answer not proven optimal (see solve_plan)
    method: str = "dp"  # which solver found it: "dp", "milp" or "heuristic"
    ingest: IngestStage | None = None  # None: stage 1's device decodes the frames

    def to_placement(self, version: int, model: str, issued_at: float) -> Placement:
        """What the gateway publishes retained (validated by the schema: contiguous, distinct nodes)."""
        return Placement(
            version=version, model=model, n_blocks=self.stages[-1].last_block + 1, issued_at=issued_at,
            bottleneck_s=self.bottleneck_s, ingest_node=self.ingest.device if self.ingest else None,
            stages=[StageAssignment(stage=k, node_id=s.device, first_block=s.first_block, last_block=s.last_block)
                    for k, s in enumerate(self.stages, start=1)])

    def to_dict(self) -> dict:
        return {
            "bottleneck_s": self.bottleneck_s,
            "frame_upload_s": self.frame_upload_s,
            "exact": self.exact,
            "method": self.method,
            "stages": [{"device": s.device, "blocks": [s.first_block, s.last_block], "compute_s": s.compute_s,
                        "transfer_s": s.transfer_s, "memory_bytes": s.memory_bytes} for s in self.stages],
            "ingest": None if self.ingest is None else {"device": self.ingest.device, "decode_s": self.ingest.decode_s,
                                                        "transfer_s": self.ingest.transfer_s},
        }


def cost_assignment(problem: PlacementProblem, assignment: Sequence[tuple[str, int, int]]) -> Plan:
    """The plan running ``(device, first_block, last_block)`` stages, with its costs: every solver is judged by it."""
    if not assignment:
        raise ValueError("a plan needs at least one stage")
    devices = [device for device, _, _ in assignment]
    if len(set(devices)) != len(devices):
        raise ValueError(f"a device appears in two stages: {devices}")
    expected = 0
    for device, first, last in assignment:
        if device not in problem._device:
            raise ValueError(f"unknown device {device}")
        if first != expected or last < first:
            raise ValueError(f"stages must cover blocks contiguously from 0; got {first}..{last} after {expected - 1}")
        expected = last + 1
    if expected != problem.n_blocks:
        raise ValueError(f"stages cover blocks 0..{expected - 1} but the model has {problem.n_blocks}")

    receivers = devices[1:] + [GATEWAY]
    stages = [stage_cost(problem, device, first, last, (receiver,))
              for (device, first, last), receiver in zip(assignment, receivers)]
    frame_upload = problem.frame_bytes / problem.bandwidth(CAMERA, devices[0])
    bottleneck = max([frame_upload] + [max(s.compute_s, s.transfer_s) for s in stages])
    return Plan(bottleneck, frame_upload, tuple(stages))


def stage_cost(problem: PlacementProblem, device: str, first: int, last: int, receivers: Iterable[str]) -> Stage:
    """Blocks ``first..last`` on ``device``, sending to the slowest-linked of ``receivers``: the one stage cost
    every planner (chain or hybrid) judges by; InfeasiblePlacement when the blocks do not fit its memory."""
    memory = problem.memory(first, last + 1)
    cap = problem._device[device].memory_bytes
    if memory > cap:
        raise InfeasiblePlacement(f"blocks {first}..{last} need {memory / MB:.1f} MB but device {device} "
                                  f"has {cap / MB:.1f} MB")
    return Stage(device, first, last, problem.compute(device, first, last + 1),
                 problem.bytes_into(last + 1) / problem.bandwidth_to_any(device, receivers), memory)


def plan_pipeline(profile_by_device: Mapping[str, Sequence[BlockProfile]], devices: Sequence[Device],
                  frame_bytes: int, camera_bandwidth_bps: float,
                  links: Mapping[tuple[str, str], float] | None = None,
                  decode_s: Mapping[str, float] | None = None) -> Plan:
    """The best plan from each device's own profile (the gateway's entry point; see :func:`solve_plan`)."""
    return solve_plan(problem_from_profiles(profile_by_device, devices, frame_bytes, camera_bandwidth_bps, links,
                                            decode_s))


def problem_from_profiles(profile_by_device: Mapping[str, Sequence[BlockProfile]], devices: Sequence[Device],
                          frame_bytes: int, camera_bandwidth_bps: float,
                          links: Mapping[tuple[str, str], float] | None = None,
                          decode_s: Mapping[str, float] | None = None) -> PlacementProblem:
    """Merge per-device profiles; they must describe the same blocks (latency is the only per-device part)."""
    if not devices:
        raise ValueError("no devices to place the model on")
    missing = [d.id for d in devices if d.id not in profile_by_device]
    if missing:
        raise ValueError(f"no profile for device(s) {', '.join(missing)}")
    reference_id = devices[0].id
    reference = profile_by_device[reference_id]
    blocks = tuple(Block(p.name, p.param_bytes, p.activation_bytes, p.output_bytes) for p in reference)
    for device in devices[1:]:
        other = tuple(Block(p.name, p.param_bytes, p.activation_bytes, p.output_bytes)
                      for p in profile_by_device[device.id])
        if other != blocks:
            raise ValueError(f"profiles of {device.id} and {reference_id} describe different blocks "
                             f"(another model or model version?)")
    return PlacementProblem(blocks, tuple(devices),
                            {d.id: [p.latency_s for p in profile_by_device[d.id]] for d in devices},
                            frame_bytes, camera_bandwidth_bps, dict(links or {}), dict(decode_s or {}))


# --- decoding on a device of its own ------------------------------------------------------------------


def plan_with_ingest(problem: PlacementProblem, input_bytes: int, ingest_only: Collection[str] = (),
                     min_gain: float = 0.0) -> Plan:
    """The best plan with the frames decoded by stage 1's device, or by a dedicated ingest device.

    Every device whose decode cost is known (``problem.decode_s``) is tried as the ingest device:
    it leaves the stage pool, pays its decode, and sends stage 1 ``input_bytes`` (the model-sized
    input) over its link; stage 1 then decodes nothing. The plan with the smaller bottleneck wins
    (decode on stage 1 on a tie: one device fewer). Devices in ``ingest_only`` (nodes of the ingest
    role) never run a stage, and are tried first as the ingest device. Each option is solved by
    :func:`solve_plan`, so the answer is exact whenever those are. An ingest device (one more hop and
    one more device to lose) must beat decoding on stage 1 by the fraction ``min_gain``: a gain
    within measurement noise is not worth it.
    """
    ids = [d.id for d in problem.devices]
    best, refusal = None, None
    stage_pool = [d for d in ids if d not in ingest_only]
    if stage_pool:
        try:
            best = solve_plan(subproblem(problem, stage_pool))
        except InfeasiblePlacement as exc:
            refusal = exc
    on_stage_1 = best
    # ingest-only devices first: on a tie they ingest, and the stage devices keep the stages
    for ingest in sorted((d for d in ids if d in problem.decode_s), key=lambda d: d not in ingest_only):
        pool = [d for d in stage_pool if d != ingest]
        if not pool:
            continue
        try:
            candidate = plan_behind_ingest(problem, ingest, input_bytes, pool)
        except InfeasiblePlacement:
            continue
        required = max(min_gain, 1e-12) if best is on_stage_1 else 1e-12
        if best is None or candidate.bottleneck_s < best.bottleneck_s * (1 - required):
            best = candidate
    if best is None:
        raise refusal or InfeasiblePlacement(f"no device may run a stage ({', '.join(ids)} may only ingest)")
    return best


def with_every_device(problem: PlacementProblem, plan: Plan, devices: Collection[str], input_bytes: int) -> Plan | None:
    """``plan`` with each of ``devices`` it leaves out given a share of a stage's slice: the split (before or
    after the stage's own part, at any block) with the smallest bottleneck; None when one cannot be fitted
    (fewer blocks than devices, or memory).

    The planner only minimises the bottleneck, so when a slowed device's block is the bottleneck, a plan that
    drops another slowed device costs the same and may win the tie. Run-time moves keep every placed node
    (:meth:`gateway.live_placement.LivePlacement.replan_for_slowdowns`), so they ask for this completion
    instead of giving up on the move.
    """
    ingest = plan.ingest.device if plan.ingest is not None else None
    stages = [(s.device, s.first_block, s.last_block) for s in plan.stages]
    missing = sorted(set(devices) - {device for device, _, _ in stages} - {ingest})
    completed = plan
    for device in missing:
        candidates = []
        for k, (holder, first, last) in enumerate(stages):
            for cut in range(first, last):
                for pair in (((device, first, cut), (holder, cut + 1, last)),
                             ((holder, first, cut), (device, cut + 1, last))):
                    try:
                        candidates.append(cost_with_ingest(problem, [*stages[:k], *pair, *stages[k + 1:]], ingest,
                                                           input_bytes))
                    except InfeasiblePlacement:
                        continue
        if not candidates:
            return None
        completed = min(candidates, key=lambda candidate: candidate.bottleneck_s)
        stages = [(s.device, s.first_block, s.last_block) for s in completed.stages]
    return replace(completed, exact=False, method=plan.method) if missing else plan


def plan_behind_ingest(problem: PlacementProblem, ingest: str, input_bytes: int, pool: Sequence[str]) -> Plan:
    """The best plan of stages on the devices ``pool`` behind the ingest device ``ingest``."""
    return _behind_ingest(problem, ingest, solve_plan(ingest_problem(problem, ingest, input_bytes, pool)))


def cost_with_ingest(problem: PlacementProblem, assignment: Sequence[tuple[str, int, int]], ingest: str | None,
                     input_bytes: int) -> Plan:
    """:func:`cost_assignment` for stages behind ``ingest`` (None: stage 1 decodes)."""
    if ingest is None:
        return cost_assignment(problem, assignment)
    pool = [d.id for d in problem.devices if d.id != ingest]
    return _behind_ingest(problem, ingest, cost_assignment(ingest_problem(problem, ingest, input_bytes, pool),
                                                           assignment))


def ingest_problem(problem: PlacementProblem, ingest: str, input_bytes: int, pool: Sequence[str]) -> PlacementProblem:
    """The stages' own problem behind ``ingest``: devices ``pool``, no decode, and in place of the camera the
    ingest device, sending ``input_bytes`` at its uplink (or its link to a device)."""
    sub = subproblem(problem, pool)
    links = {pair: bw for pair, bw in sub.links.items() if pair[0] != CAMERA}
    links.update({(CAMERA, receiver): bw for (sender, receiver), bw in problem.links.items()
                  if sender == ingest and receiver in pool})
    return replace(sub, frame_bytes=input_bytes, camera_bandwidth_bps=problem._device[ingest].bandwidth_bps,
                   links=links, decode_s={})


def subproblem(problem: PlacementProblem, keep: Sequence[str]) -> PlacementProblem:
    """``problem`` on the devices ``keep`` only."""
    kept = set(keep)
    return PlacementProblem(problem.blocks, tuple(d for d in problem.devices if d.id in kept),
                            {d: t for d, t in problem.compute_s.items() if d in kept},
                            problem.frame_bytes, problem.camera_bandwidth_bps,
                            {(a, b): bw for (a, b), bw in problem.links.items()
                             if a in kept | {CAMERA} and b in kept | {GATEWAY}},
                            {d: t for d, t in problem.decode_s.items() if d in kept})


def _behind_ingest(problem: PlacementProblem, ingest: str, inner: Plan) -> Plan:
    """A plan of the stages' problem (:func:`ingest_problem`) with the ingest device in front: its frame upload
    and decode join the bottleneck; the inner plan's "frame upload" is the ingest's transfer to stage 1."""
    upload = problem.frame_bytes / problem.bandwidth(CAMERA, ingest)
    stage = IngestStage(ingest, problem.decode_s.get(ingest, 0.0), inner.frame_upload_s)
    return replace(inner, bottleneck_s=max(inner.bottleneck_s, upload, stage.decode_s), frame_upload_s=upload,
                   ingest=stage)


# --- the exact solver --------------------------------------------------------------------------------


def device_types(problem: PlacementProblem) -> list[list[str]]:
    """Groups of devices that are interchangeable in *every* respect the cost model sees.

    Merging devices that merely share a compute profile (but differ in memory cap, uplink or a
    link) would let the DP cost a stage with one host's numbers and run it on another's: the
    PipeEdge bug class. Two devices join a group only if swapping them leaves the problem
    unchanged; transpositions generate every permutation, so a whole group is interchangeable.
    """
    groups: list[list[str]] = []
    for device in problem.devices:
        group = next((g for g in groups if all(_interchangeable(problem, device.id, other) for other in g)), None)
        if group is None:
            groups.append([device.id])
        else:
            group.append(device.id)
    return groups


def _interchangeable(problem: PlacementProblem, a: str, b: str) -> bool:
    da, db = problem._device[a], problem._device[b]
    if (da.memory_bytes, da.bandwidth_bps) != (db.memory_bytes, db.bandwidth_bps):
        return False
    if (tuple(problem.compute_s[a]), problem.decode_s.get(a, 0.0)) != (tuple(problem.compute_s[b]),
                                                                        problem.decode_s.get(b, 0.0)):
        return False
    if problem.bandwidth(a, b) != problem.bandwidth(b, a):
        return False
    others = [d.id for d in problem.devices if d.id not in (a, b)]
    return (all(problem.bandwidth(a, x) == problem.bandwidth(b, x) for x in others + [GATEWAY])
            and all(problem.bandwidth(x, a) == problem.bandwidth(x, b) for x in others + [CAMERA]))


def optimal_plan(problem: PlacementProblem) -> Plan:
    """The minimum-bottleneck plan: a min-max DP over (blocks placed, multiset of device types used, last type).

    ``best[c][s][i]`` = the smallest bottleneck of placing blocks ``0..i-1`` with the multiset
    ``c`` of types, the last stage on type ``s``, not yet counting that stage's output transfer
    (it depends on the next stage's device). A new stage of type ``t`` over blocks ``i..j-1``:
    ``max(best[c][s][i], transfer s->t of block i-1's output, compute/memory of i..j-1 on t)``.
    Minimising over ``s`` first leaves one min-max matrix product per (c, t), vectorised in numpy.
    States: at most prod(count_t + 1) multisets with at most n_blocks stages; time
    O(states * types * n_blocks^2). States already as slow as a finished plan are not extended,
    which in practice prunes most of them (a one-device plan is often found first).
    """
    _check_every_block_fits(problem)
    groups = device_types(problem)
    n_types, n_blocks = len(groups), problem.n_blocks
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    strides = np.concatenate([[1], np.cumprod(counts + 1)[:-1]]).astype(np.int64)
    stage_cost = [_stage_cost_matrix(problem, g[0]) for g in groups]
    transfer = _transfer_costs(problem, groups)  # [sender type (n_types = camera), receiver type, start block]

    layers = [_Layer(codes=np.zeros(1, dtype=np.int64), senders=np.array([n_types]),
                     best=np.where(np.arange(n_blocks + 1) == 0, 0.0, np.inf)[None, None, :])]
    to_gateway = np.array([problem.blocks[-1].output_bytes / problem.bandwidth(g[0], GATEWAY) for g in groups])
    best_value, best_at = math.inf, None
    cells = 0
    for k in range(1, min(len(problem.devices), n_blocks) + 1):
        # A partial plan already as slow as a finished one cannot lead to a better plan: do not extend it.
        promising = (layers[-1].best < best_value).any(axis=(1, 2))
        children, can_grow = _children(layers[-1], promising, counts, strides)
        cells += len(children) * n_types * (n_blocks + 1)
        if cells > MAX_DP_CELLS:
            raise ValueError(f"{len(problem.devices)} devices in {n_types} distinct types need more than "
                             f"{MAX_DP_CELLS:.0e} DP cells; give near-identical devices identical profiles, "
                             f"caps and bandwidths so they merge into one type")
        layer = _next_layer(layers[-1], children, can_grow, strides, stage_cost, transfer)
        layers.append(layer)
        finished = np.maximum(layer.best[:, :, n_blocks], to_gateway[None, :])
        if finished.size and finished.min() < best_value:
            best_value = float(finished.min())
            best_at = (k, *np.unravel_index(int(finished.argmin()), finished.shape))
    if best_at is None:
        raise InfeasiblePlacement(_shortfall_message(problem, layers))
    plan = cost_assignment(problem, _backtrack(layers, best_at, groups, strides, n_blocks))
    assert math.isclose(plan.bottleneck_s, best_value, rel_tol=1e-9, abs_tol=1e-15), \
        "DP and cost_assignment disagree"
    return plan


@dataclass
class _Layer:
    """All DP states that use the same number of devices."""

    codes: np.ndarray  # mixed-radix code of each multiset of types, sorted
    senders: np.ndarray  # type index of the last stage for axis 1 of ``best`` (n_types = the camera)
    best: np.ndarray  # [state, sender, blocks placed] -> bottleneck so far
    came_from_block: np.ndarray | None = None  # [state, sender, blocks placed] -> start of the last stage
    came_from_sender: np.ndarray | None = None  # ... -> type of the stage before it


def _children(layer: _Layer, promising: np.ndarray, counts: np.ndarray,
              strides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the multisets one more device away from a ``promising`` state, and which types each can add."""
    digits = (layer.codes[:, None] // strides[None, :]) % (counts + 1)[None, :]
    can_grow = (digits < counts[None, :]) & promising[:, None]
    return np.unique(np.concatenate([layer.codes[can_grow[:, t]] + strides[t] for t in range(len(counts))])), can_grow


def _next_layer(layer: _Layer, children: np.ndarray, can_grow: np.ndarray, strides: np.ndarray,
                stage_cost: list[np.ndarray], transfer: np.ndarray) -> _Layer:
    """The best way to reach each of ``children`` with one more stage (of type t, from a state that can grow by t)."""
    n_types, width = can_grow.shape[1], layer.best.shape[2]
    best = np.full((len(children), n_types, width), np.inf)
    from_block = np.zeros(best.shape, dtype=np.int16)
    from_sender = np.zeros(best.shape, dtype=np.int16)
    chunk = max(1, 4_000_000 // (width * width))
    for t in range(n_types):
        parents = np.flatnonzero(can_grow[:, t])
        for start in range(0, len(parents), chunk):
            rows = parents[start:start + chunk]
            # Entering a stage of type t at block i, from whichever sender type is cheapest.
            entering = np.maximum(layer.best[rows], transfer[layer.senders, t][None, :, :])
            sender = entering.argmin(axis=1)
            entering = np.take_along_axis(entering, sender[:, None, :], axis=1)[:, 0, :]
            total = np.maximum(entering[:, :, None], stage_cost[t][None, :, :])  # [row, i, j]
            start_block = total.argmin(axis=1)
            target = np.searchsorted(children, layer.codes[rows] + strides[t])
            best[target, t] = np.take_along_axis(total, start_block[:, None, :], axis=1)[:, 0, :]
            from_block[target, t] = start_block
            from_sender[target, t] = layer.senders[np.take_along_axis(sender, start_block, axis=1)]
    return _Layer(children, np.arange(n_types), best, from_block, from_sender)


def _backtrack(layers: list[_Layer], best_at: tuple[int, int, int], groups: list[list[str]],
               strides: np.ndarray, end: int) -> list[tuple[str, int, int]]:
    k, state, sender = best_at
    typed_stages = []
    while k > 0:
        layer = layers[k]
        start = int(layer.came_from_block[state, sender, end])
        typed_stages.append((int(sender), start, end - 1))
        code = layer.codes[state] - strides[sender]
        sender = int(layer.came_from_sender[state, sender, end])
        k, end = k - 1, start
        state = int(np.searchsorted(layers[k].codes, code))
    unused = [list(g) for g in groups]  # any member of a type is as good as any other
    return [(unused[t].pop(0), first, last) for t, first, last in reversed(typed_stages)]


def _stage_cost_matrix(problem: PlacementProblem, device: str) -> np.ndarray:
    """[i, j] = compute of blocks i..j-1 on ``device``, or inf if j <= i or they do not fit its memory."""
    if device in problem._stage_costs:
        return problem._stage_costs[device]
    prefix = problem._compute_prefix[device]
    params = problem._param_prefix
    memory = params[None, :] - params[:, None] + problem._peak_activation
    ordered = np.triu(np.ones(memory.shape, dtype=bool), k=1)
    fits = ordered & (memory <= problem._device[device].memory_bytes)
    cost = np.where(fits, prefix[None, :] - prefix[:, None], np.inf)
    cost[0, 1:] += problem.decode_s.get(device, 0.0)  # stage 1 decodes the camera frame
    problem._stage_costs[device] = cost
    return cost


def _transfer_costs(problem: PlacementProblem, groups: list[list[str]]) -> np.ndarray:
    """[sender type or camera, receiver type, i] = seconds to send what block i needs (frame if i = 0)."""
    n_types = len(groups)
    incoming = np.array([problem.bytes_into(i) for i in range(problem.n_blocks + 1)], dtype=np.float64)
    senders = [g[0] for g in groups] + [CAMERA]
    cost = np.empty((n_types + 1, n_types, problem.n_blocks + 1))
    for s, sender in enumerate(senders):
        for t, group in enumerate(groups):
            # Within one type the link goes to *another* member; every member pair has the same bandwidth.
            receiver = next((member for member in group if member != sender), None)
            cost[s, t] = np.inf if receiver is None else incoming / problem.bandwidth(sender, receiver)
    return cost


def _check_every_block_fits(problem: PlacementProblem) -> None:
    largest = max(problem.devices, key=lambda d: d.memory_bytes)
    for index, block in enumerate(problem.blocks):
        need = block.param_bytes + block.activation_bytes
        if need > largest.memory_bytes:
            raise InfeasiblePlacement(
                f"block {index} ({block.name}) needs {need / MB:.1f} MB but the largest device cap is "
                f"{largest.memory_bytes / MB:.1f} MB ({largest.id})")


def _shortfall_message(problem: PlacementProblem, layers: list[_Layer]) -> str:
    reached = max(int(np.flatnonzero(np.isfinite(layer.best).any(axis=(0, 1))).max(initial=0)) for layer in layers)
    block = problem.blocks[reached]
    return (f"the memory caps do not fit the model on {len(problem.devices)} device(s): at best blocks "
            f"0..{reached - 1} fit, block {reached} ({block.name}) and later would need more devices or memory "
            f"(total caps {sum(d.memory_bytes for d in problem.devices) / MB:.1f} MB)")


# --- every node of a site: the planner that scales -------------------------------------------------------

# The type DP is used when its unpruned table is at most this big (about 0.2 s); beyond, the MILP is faster.
SOLVE_DP_CELLS = 2_000_000
# How long the mixed-integer program may search for a plan better than the heuristic's before that one stands.
MILP_TIME_LIMIT_S = 0.5


def solve_plan(problem: PlacementProblem, time_limit_s: float = MILP_TIME_LIMIT_S) -> Plan:
    """The planner for any number of devices: exact where an exact method fits, a plan whenever one exists.

    1. Devices that merge into few types: the type DP (:func:`optimal_plan`), exact.
    2. Otherwise (every live node profiles itself, so every node is its own type):
       :func:`heuristic_plan` (polynomial: ordered DPs and bottleneck assignments), then a mixed-integer
       program (HiGHS, :func:`milp_plan`) looks for a strictly better plan for up to ``time_limit_s``.
       When it finishes the answer is proven optimal (``exact``); when time runs out the best plan
       found stands with ``exact=False``. With device-to-device ``links`` the MILP still improves the
       plan but cannot prove it (it costs a transfer by the sender's uplink).
    3. If neither found a plan, the MILP searches for any memory-feasible one without a time limit,
       so "no plan" is only ever said when none exists.
    """
    _check_every_block_fits(problem)
    if dp_cells_bound(problem) <= SOLVE_DP_CELLS:
        return optimal_plan(problem)
    plan = heuristic_plan(problem)
    provable = not _device_links(problem)
    bound = plan.bottleneck_s if plan is not None else math.inf
    stages, finished = milp_plan(problem, below=bound, time_limit_s=time_limit_s)
    if stages is not None:
        found = cost_assignment(problem, stages)
        if plan is None or found.bottleneck_s < plan.bottleneck_s:
            plan = replace(found, method="milp")
    if plan is None:
        stages, _ = milp_plan(problem, below=math.inf, time_limit_s=None)
        if stages is None:
            raise InfeasiblePlacement(f"the memory caps do not fit the model on {len(problem.devices)} device(s) "
                                      f"(total caps {sum(d.memory_bytes for d in problem.devices) / MB:.1f} MB)")
        return replace(cost_assignment(problem, stages), exact=False, method="milp")
    return replace(plan, exact=finished and provable)


def dp_cells_bound(problem: PlacementProblem) -> int:
    """Cells the type DP would need without pruning: multisets of <= n_blocks devices x types x (blocks + 1)."""
    groups = device_types(problem)
    limit = min(len(problem.devices), problem.n_blocks)
    ways = [1] + [0] * limit  # ways[k] = multisets of k devices drawn from the types seen so far
    for group in groups:
        ways = [sum(ways[k - c] for c in range(min(k, len(group)) + 1)) for k in range(limit + 1)]
    return sum(ways[1:]) * len(groups) * (problem.n_blocks + 1)


def _device_links(problem: PlacementProblem) -> bool:
    return any(s != CAMERA and r != GATEWAY for s, r in problem.links)


def ordered_plan(problem: PlacementProblem, order: Sequence[str]) -> Plan | None:
    """The best plan whose stages use devices in the relative ``order`` given (any subsequence).

    Exact for that order, links included; O(D^2 n + D n^2).

    ``g[m, j]`` = smallest bottleneck placing blocks ``0..j-1`` with the last stage on ``order[m]``,
    not yet counting its outgoing transfer (the next device decides it), as in the type DP.
    """
    n, size = problem.n_blocks, len(order)
    incoming = problem._incoming
    bandwidth = _bandwidth_matrix(problem, order)
    columns = np.arange(n + 1)
    g = np.full((size, n + 1), np.inf)
    from_block = np.zeros((size, n + 1), dtype=np.int64)
    from_device = np.full((size, n + 1), -1, dtype=np.int64)
    for m, device in enumerate(order):
        entering = np.full(n + 1, np.inf)
        entering[0] = problem.frame_bytes / problem.bandwidth(CAMERA, device)
        sender = np.full(n + 1, -1, dtype=np.int64)
        if m:
            via = np.maximum(g[:m], incoming[None, :] / bandwidth[:m, m][:, None])
            best_sender = via.argmin(axis=0)
            value = via[best_sender, columns]
            better = value < entering
            entering, sender = np.where(better, value, entering), np.where(better, best_sender, -1)
        total = np.maximum(entering[:, None], _stage_cost_matrix(problem, device))
        start = total.argmin(axis=0)
        g[m], from_block[m], from_device[m] = total[start, columns], start, sender[start]
    to_gateway = np.array([problem.blocks[-1].output_bytes / problem.bandwidth(d, GATEWAY) for d in order])
    final = np.maximum(g[:, n], to_gateway)
    m = int(final.argmin())
    if not np.isfinite(final[m]):
        return None
    stages, end = [], n
    while m >= 0:
        start = int(from_block[m, end])
        stages.append((order[m], start, end - 1))
        m, end = int(from_device[m, end]), start
    return cost_assignment(problem, stages[::-1])


def _bandwidth_matrix(problem: PlacementProblem, order: Sequence[str]) -> np.ndarray:
    """[a, b] = ``problem.bandwidth(order[a], order[b])``, inf on the diagonal (a device never sends to itself):
    uplinks broadcast, then the links, instead of one lookup per pair (ordered_plan's hot spot on 50 devices)."""
    position = {device: k for k, device in enumerate(order)}
    matrix = np.repeat(np.array([problem._device[d].bandwidth_bps for d in order], dtype=np.float64)[:, None],
                       len(order), axis=1)
    for (sender, receiver), bandwidth in problem.links.items():
        if sender in position and receiver in position:
            matrix[position[sender], position[receiver]] = bandwidth
    np.fill_diagonal(matrix, np.inf)
    return matrix


def heuristic_plan(problem: PlacementProblem, rounds: int = 8) -> Plan | None:
    """A good plan in polynomial time, or None if it found no memory-feasible one (there may still be one).

    Starts from :func:`ordered_plan` on a few device orders (fastest first, slowest first, largest
    memory first, as listed), then alternates two exact sub-steps until neither improves: for the
    plan's slices, the bottleneck assignment of devices to slices (a device may also stay unused);
    for the order that gives, :func:`ordered_plan` re-cuts the blocks, with the unused devices
    placed beside the device closest to them in speed so they can take a share of its work. Last,
    :func:`_swap_search` swaps the bottleneck stage's device with each other device in the order.
    """
    speed = {d.id: problem.compute(d.id, 0, problem.n_blocks) for d in problem.devices}
    ids = [d.id for d in problem.devices]
    orders = [sorted(ids, key=speed.get), sorted(ids, key=speed.get, reverse=True),
              sorted(ids, key=lambda d: -problem._device[d].memory_bytes), ids]
    plans = [p for p in (ordered_plan(problem, order) for order in orders) if p is not None]
    if not plans:
        return None
    best = min(plans, key=lambda p: p.bottleneck_s)
    for _ in range(rounds):
        assigned = _bottleneck_assignment(problem, [(s.first_block, s.last_block + 1) for s in best.stages])
        order = list(assigned)
        for device in sorted(set(ids) - set(assigned), key=speed.get):
            nearest = min(range(len(order)), key=lambda k: abs(math.log((speed[order[k]] + 1e-12)
                                                                         / (speed[device] + 1e-12))))
            order.insert(nearest + 1, device)
        candidate = ordered_plan(problem, order)
        if candidate is None or candidate.bottleneck_s >= best.bottleneck_s * (1 - 1e-12):
            break
        best = candidate
    best = _swap_search(problem, best, [d for d in orders[0] if d not in {s.device for s in best.stages}])
    return replace(best, exact=False, method="heuristic")


def _swap_search(problem: PlacementProblem, plan: Plan, unused: list[str], passes: int = 4) -> Plan:
    """First-improvement local search: the device of the bottleneck stage trades places with another device.

    The order is the plan's devices followed by the unused ones; :func:`ordered_plan` re-cuts
    each candidate order exactly, so a swap may also hand the slow stage's work to a neighbour.
    """
    for _ in range(passes):
        order = [s.device for s in plan.stages] + unused
        slowest = max(range(len(plan.stages)), key=lambda k: max(plan.stages[k].compute_s, plan.stages[k].transfer_s))
        improved = False
        for other in range(len(order)):
            if other == slowest:
                continue
            candidate_order = list(order)
            candidate_order[slowest], candidate_order[other] = candidate_order[other], candidate_order[slowest]
            candidate = ordered_plan(problem, candidate_order)
            if candidate is not None and candidate.bottleneck_s < plan.bottleneck_s * (1 - 1e-12):
                plan, improved = candidate, True
                used = {s.device for s in plan.stages}
                unused = [d for d in candidate_order if d not in used]
                break
        if not improved:
            break
    return plan


def _segment_costs(problem: PlacementProblem, device: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Stage cost of ``device`` on slices ``starts[k]..ends[k]-1`` with link-free transfers; inf if it does not fit.

    Link-free: the output travels at the device's uplink (to the gateway: the gateway link), the
    frame at the camera's link to it, so the cost depends on the device and the slice only.
    """
    prefix = problem._compute_prefix[device]
    memory = problem._param_prefix[ends] - problem._param_prefix[starts] + problem._peak_activation[starts, ends]
    outgoing = problem._incoming[ends]
    uplink = problem._device[device].bandwidth_bps
    out_bw = np.where(ends == problem.n_blocks, problem.bandwidth(device, GATEWAY), uplink)
    compute = prefix[ends] - prefix[starts] + np.where(starts == 0, problem.decode_s.get(device, 0.0), 0.0)
    cost = np.maximum(compute, outgoing / out_bw)
    cost = np.where(starts == 0, np.maximum(cost, problem.frame_bytes / problem.bandwidth(CAMERA, device)), cost)
    return np.where(memory <= problem._device[device].memory_bytes, cost, np.inf)


def _bottleneck_assignment(problem: PlacementProblem, slices: list[tuple[int, int]]) -> list[str]:
    """Distinct devices for ``slices`` (in order) minimising the largest link-free stage cost."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    starts, ends = np.array([a for a, _ in slices]), np.array([b for _, b in slices])
    ids = [d.id for d in problem.devices]
    cost = np.stack([_segment_costs(problem, d, starts, ends) for d in ids], axis=1)  # [slice, device]
    values = np.unique(cost[np.isfinite(cost)])
    low, high, best = 0, len(values) - 1, None
    while low <= high:
        middle = (low + high) // 2
        matching = maximum_bipartite_matching(csr_matrix((cost <= values[middle]).astype(np.int8)),
                                              perm_type="column")
        if (matching >= 0).all():
            best, high = matching, middle - 1
        else:
            low = middle + 1
    assert best is not None, "the slices of a feasible plan always have an assignment: the plan's own"
    return [ids[k] for k in best]


def milp_plan(problem: PlacementProblem, below: float, time_limit_s: float | None
              ) -> tuple[list[tuple[str, int, int]] | None, bool]:
    """Stages of a plan with link-free bottleneck < ``below`` (HiGHS), and whether the search finished.

    Binary x[d, i, j]: device d runs blocks i..j-1 (only slices that fit d and cost less than
    ``below``); the chosen slices form a path 0 -> n (flow conservation at every cut), each device
    at most once, and B >= the cost of each device's slice. Minimise B. Without device-to-device
    links the link-free cost is the true cost, so a finished search with no answer proves
    ``below`` optimal. Costs are scaled to about 1 so HiGHS's absolute tolerances do not blur them.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, size = problem.n_blocks, len(problem.devices)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n + 1)])
    devices, starts, ends, costs = [], [], [], []
    for index, device in enumerate(problem.devices):
        cost = _segment_costs(problem, device.id, pairs[:, 0], pairs[:, 1])
        keep = cost < below * (1 - 1e-12)
        devices.append(np.full(int(keep.sum()), index))
        starts.append(pairs[keep, 0])
        ends.append(pairs[keep, 1])
        costs.append(cost[keep])
    device_of, start_of, end_of, cost_of = map(np.concatenate, (devices, starts, ends, costs))
    count = len(cost_of)
    if count == 0:
        return None, True
    scale = below if math.isfinite(below) else float(cost_of.max()) or 1.0
    columns = np.arange(count)
    rows, cols, data = [], [], []
    # rows 0..size-1: each device at most once; size..2size-1: cost of its slice <= B
    rows += [device_of, size + device_of, np.arange(size, 2 * size)]
    cols += [columns, columns, np.full(size, count)]
    data += [np.ones(count), cost_of / scale, -np.ones(size)]
    # rows 2size + k, k = 0..n-1: slices starting at k minus slices ending at k (= 1 at k = 0, else 0)
    flow = 2 * size
    rows += [flow + start_of, flow + end_of[end_of < n]]
    cols += [columns, columns[end_of < n]]
    data += [np.ones(count), -np.ones(int((end_of < n).sum()))]
    matrix = coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(2 * size + n, count + 1)).tocsr()
    lower = np.concatenate([np.zeros(2 * size) - np.inf, [1.0], np.zeros(n - 1)])
    lower[:size] = 0
    upper = np.concatenate([np.ones(size), np.zeros(size), [1.0], np.zeros(n - 1)])
    objective = np.zeros(count + 1)
    objective[-1] = 1.0
    options = {"mip_rel_gap": 1e-9}
    if time_limit_s is not None:
        options["time_limit"] = time_limit_s
    result = milp(objective, constraints=LinearConstraint(matrix, lower, upper),
                  integrality=np.concatenate([np.ones(count), [0]]),
                  bounds=Bounds(np.zeros(count + 1), np.concatenate([np.ones(count), [np.inf]])), options=options)
    finished = result.status in (0, 2)  # optimal, or proven infeasible (nothing below ``below``)
    if result.x is None:
        return None, finished
    chosen = np.flatnonzero(result.x[:count] > 0.5)
    stages = [(problem.devices[device_of[k]].id, int(start_of[k]), int(end_of[k]) - 1) for k in chosen]
    return sorted(stages, key=lambda stage: stage[1]), finished


# --- the reference --------------------------------------------------------------------------------------


def exhaustive_plan(problem: PlacementProblem, must_beat: float = math.inf) -> Plan | None:
    """Try every device order and cut (branch and bound on the running bottleneck), for verification only.

    Returns the best plan strictly below ``must_beat``, or None. It shares only the problem's
    cost accessors with the DP: no device types, no matrices. Exponential in devices.
    """
    n = problem.n_blocks
    ids = [d.id for d in problem.devices]
    best: list = [must_beat, None]

    def extend(start: int, sender: str, worst: float, used: list[tuple[str, int, int]]) -> None:
        taken = {device for device, _, _ in used}
        for device in ids:
            if device in taken:
                continue
            entering = max(worst, problem.bytes_into(start) / problem.bandwidth(sender, device))
            for end in range(start + 1, n + 1):
                if problem.memory(start, end) > problem._device[device].memory_bytes:
                    break
                so_far = max(entering, problem.compute(device, start, end))
                if so_far >= best[0]:
                    break  # compute only grows with more blocks
                stages = used + [(device, start, end - 1)]
                if end == n:
                    total = max(so_far, problem.blocks[-1].output_bytes / problem.bandwidth(device, GATEWAY))
                    if total < best[0]:
                        best[:] = [total, stages]
                else:
                    extend(end, device, so_far, stages)

    extend(0, CAMERA, 0.0, [])
    return None if best[1] is None else cost_assignment(problem, best[1])
