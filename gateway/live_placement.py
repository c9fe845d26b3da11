"""When to (re-)place the pipeline, as nodes come and go: pure, time is passed in.

The planner (:mod:`gateway.placement`) answers *where*; this module answers *when*:

- at start, once every configured node has offered its profile (or ``startup_wait_s`` passed);
- at once when a node of the current placement goes offline or stops: the survivors take over;
- when a node (re)joins, only after it has stayed online for ``rejoin_hold_s`` and only if the
  new plan's predicted bottleneck is at least ``min_gain`` better: a flapping node must not
  make the whole pipeline switch stages back and forth.

Frames reach stage 1 through the broker whichever node runs it, so the camera upload is the
same for every plan: it is left out of the live objective (a constant term there would only
make plans tie and hide the differences between them). Its *decode* is not: the node that runs
stage 1 pays its own decode cost for frames of ``frame_megapixels`` (from its profile), unless the
planner finds it better to give decoding to a node of its own (the placement's ``ingest_node``:
any node with a decode cost, and only those for nodes of the ``ingest`` role).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.hybrid import HybridPlan, HybridRequest, HybridStage, evaluate, plan_hybrid
from gateway.placement import (Device, InfeasiblePlacement, Plan, PlacementProblem, cost_with_ingest,
                               plan_with_ingest, problem_from_profiles, with_every_device)
from shared.imaging import model_input_bytes
from shared.profiling import MBIT_BYTES, mb_to_bytes
from shared.schemas import ModelProfile, NodeProfile, Placement, StageAssignment
from shared.topics import AVAILABILITY_ONLINE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementRules:
    startup_wait_s: float
    rejoin_hold_s: float
    min_gain: float


@dataclass(frozen=True)
class HybridTarget:
    """Place with the hybrid planner (replicated stages) for this arrival rate and SLO (``placement_mode``)."""

    arrival_hz: float
    slo_s: float
    whole_model: bool = False  # data partitioning only: every node that holds the model is a replica of one stage
    min_parallel: int = 1  # 2: parallel pipelines only (placement_mode "parallel", for comparing them)


@dataclass(frozen=True)
class PlanWanted:
    """A hybrid plan to be made outside the gateway's lock (seconds on dozens of nodes: docs/scaling.md): the
    planner's question, frozen, and what its answer depends on (``basis``: the nodes planned over with their
    profiles, the placement in force, the target and its SLO). Equal questions have equal bases."""

    basis: tuple
    request: HybridRequest = field(compare=False)
    target: HybridTarget = field(compare=False)
    nodes: tuple[str, ...] = field(compare=False)
    reason: str = field(compare=False)


def solve(wanted: PlanWanted) -> HybridPlan | str:
    """The plan ``wanted`` asks for, or why there is none; pure, and the slow part (the service runs it on a
    worker thread)."""
    try:
        if wanted.target.whole_model:
            return whole_model_plan(wanted.request)
        return plan_hybrid(wanted.request, min_parallel=wanted.target.min_parallel)
    except (InfeasiblePlacement, ValueError) as exc:
        return str(exc)


class LivePlacement:
    def __init__(self, rules: PlacementRules, model: str, fingerprint: str, allowed: list[str], started: float,
                 frame_megapixels: float = 0.0, input_bytes: int | None = None, hybrid: HybridTarget | None = None):
        self.rules = rules
        self.hybrid = hybrid
        self._share_token = secrets.token_urlsafe(12)  # names the replicas' groups (Topics.share_group)
        self.frame_megapixels = frame_megapixels
        self.input_bytes = model_input_bytes() if input_bytes is None else input_bytes  # what an ingest node sends
        self.model = model
        self.fingerprint = fingerprint
        self.allowed = list(allowed)
        self.started = started
        self.current: Placement | None = None
        # the highest version a node may have seen (the previous run's, one left retained): nodes ignore a placement
        # below the one they have, and a restarted gateway's clock may be behind the last one's (no RTC before NTP)
        self.seen_version = 0
        self.last_error: str | None = None
        self._status: dict[str, str] = {}
        self._online_since: dict[str, float] = {}
        self._offers: dict[str, NodeProfile] = {}
        self._declined: frozenset[str] | None = None  # node set last judged not worth a switch
        self.asked: PlanWanted | None = None  # the hybrid plan asked for and not answered yet
        self._no_plan: PlanWanted | None = None  # the last question answered with no plan: not asked again

    # --- inputs --------------------------------------------------------------------------
    def set_status(self, node_id: str, status: str, now: float) -> None:
        if status == AVAILABILITY_ONLINE and self._status.get(node_id) != AVAILABILITY_ONLINE:
            self._online_since[node_id] = now
        self._status[node_id] = status

    def set_offer(self, offer: NodeProfile) -> str | None:
        """Record a node's profile; returns why it is unusable, if it is."""
        if offer.model_fingerprint != self.fingerprint:
            self._offers.pop(offer.node_id, None)
            return (f"node {offer.node_id} runs model {offer.model_fingerprint}, the gateway {self.fingerprint}: "
                    "not placed until both run the same checkpoint")
        self._offers[offer.node_id] = offer
        return None

    def forget(self, node_id: str) -> None:
        """A retired node: never placed again (until it offers itself anew)."""
        self._offers.pop(node_id, None)
        self._status.pop(node_id, None)
        self._online_since.pop(node_id, None)

    # --- decisions -----------------------------------------------------------------------
    def profiles(self) -> dict[str, ModelProfile]:
        """Each known node's block profile (the control loop predicts a moved node's curve from it)."""
        return {n: offer.profile for n, offer in self._offers.items()}

    def eligible(self) -> list[str]:
        """Online nodes with a usable profile, in configured order."""
        return [n for n in self.allowed if self._status.get(n) == AVAILABILITY_ONLINE and n in self._offers]

    def tick(self, now: float) -> Placement | None:
        """A new placement to publish, or None when the current one stands; a hybrid plan is made at once."""
        decided = self.decide(now)
        return self.take(decided, solve(decided), now) if isinstance(decided, PlanWanted) else decided

    def decide(self, now: float) -> Placement | PlanWanted | None:
        """As :meth:`tick`, but a hybrid plan is only asked for (:class:`PlanWanted`, once per question), to be
        solved elsewhere and handed to :meth:`take`. The one-pipeline planner is fast (tens of ms on 50 nodes):
        it places at once."""
        decided = self._decide(now)
        if isinstance(decided, PlanWanted):
            if decided in (self.asked, self._no_plan):  # being solved, or no plan until something changes
                return None
            self.asked = decided  # the newest question: an answer to an older one is refused
        return decided

    def take(self, wanted: PlanWanted, solved: HybridPlan | str, now: float) -> Placement | None:
        """The answer to ``wanted``: adopted only if it is the question still open and nothing it depends on changed
        meanwhile (a node came or went, re-offered its profile, another placement or SLO came); else refused, and
        :meth:`decide` asks anew."""
        if wanted != self.asked:
            log.info("hybrid plan (%s) dropped: a newer one is asked for", wanted.reason)
            return None
        self.asked = None
        if self._decide(now) != wanted:
            log.info("hybrid plan (%s) dropped: its nodes, their profiles, the placement or the SLO changed while "
                     "it was made", wanted.reason)
            return None
        if isinstance(solved, str):
            self.last_error, self._no_plan = solved, wanted
            log.error("cannot place the model on %s: %s", list(wanted.nodes), solved)
            return None
        self.last_error = None
        placement = None
        if self.current is None or layout(solved) != [
                (s.pipeline, tuple(s.nodes), s.first_block, s.last_block) for s in self.current.stages]:
            placement = self._take_hybrid(solved, self._version(now), list(wanted.nodes), now, wanted.reason)
        # the plan may leave slow nodes out on purpose: not asked again until the nodes change
        self._declined = frozenset(wanted.nodes)
        return placement

    def _decide(self, now: float) -> Placement | PlanWanted | None:
        eligible = self.eligible()
        if not eligible:
            return None
        if self.current is None:
            if set(eligible) == set(self.allowed) or now - self.started >= self.rules.startup_wait_s:
                return self._adopt(eligible, now, "initial placement")
            return None
        placed = self._placed()
        lost = [n for n in placed if n not in eligible]
        if lost:
            return self._adopt(eligible, now, f"lost {', '.join(lost)}")
        settled = [n for n in eligible if n in placed or now - self._online_since.get(n, now)
                   >= self.rules.rejoin_hold_s]
        if set(settled) == set(placed) or frozenset(settled) == self._declined:
            return None
        if self.hybrid is not None:  # a replica more never lowers a hybrid plan's rate: rejoin_hold_s is the hysteresis
            return self._adopt(settled, now, "nodes joined")
        if self.current.node_ids() != [s.node_id for s in self.current.pipelines[0]]:
            # replicated stages or parallel pipelines from a rate re-plan (rate_replan = "apply"): the one-pipeline
            # planner cannot weigh them against its own plan; the next rate re-plan places the nodes that joined
            self._declined = frozenset(settled)
            log.info("keeping the rate re-plan's replicated or parallel placement: %s wait for the next rate re-plan",
                     ", ".join(n for n in settled if n not in placed))
            return None
        candidate = self._plan(settled)
        if candidate is None:
            return None
        current = self._plan_cost_of_current()
        if candidate.bottleneck_s <= current * (1.0 - self.rules.min_gain):
            return self._adopt(settled, now, f"nodes joined, bottleneck {current * 1e3:.1f} -> "
                                             f"{candidate.bottleneck_s * 1e3:.1f} ms", candidate)
        self._declined = frozenset(settled)
        log.info("keeping the placement: using %s would gain less than %.0f%%", settled, 100 * self.rules.min_gain)
        return None

    def replan_for_slowdowns(self, slowdowns: dict[str, float], now: float) -> Placement | None:
        """Run-time re-partitioning: re-plan the placed nodes with their profiles stretched by the measured
        slowdowns, and adopt the plan if it cuts the (stretched) bottleneck by at least ``min_gain``.

        No accuracy is lost, but every node whose blocks move rebuilds its slice and re-calibrates:
        the benchmark (``edgeprune bench pipeline``, policy ``replace``) measures what that costs.
        """
        if self.current is None or self.current.node_ids() != [s.node_id for s in self.current.pipelines[0]]:
            return None  # replicated stages and parallel pipelines are not re-partitioned (the controller prunes)
        placed = self._placed()
        if any(n not in self._offers for n in placed):
            return None
        problem = self._problem(placed, slowdowns)
        try:
            plan = plan_with_ingest(problem, self.input_bytes, self._ingest_only(placed),
                                    self.rules.min_gain)
        except (InfeasiblePlacement, ValueError) as exc:
            log.error("cannot re-partition over %s: %s", placed, exc)
            return None
        # leaving a node out is no move: the next tick re-places every eligible node (undoing it within a second,
        # measured), and a node dropped from the placement idles with the frames it had queued; so a plan that
        # drops one gives it a share of a slice instead (at worst the cheapest block)
        plan = with_every_device(problem, plan, self._stage_capable(placed), self.input_bytes)
        if plan is None or {s.device for s in plan.stages} | ({plan.ingest.device} if plan.ingest else set()) != set(
                placed):  # an ingest node left out (it runs no stage)
            return None
        current = self._cost_of_current(problem).bottleneck_s
        if plan.bottleneck_s > current * (1.0 - self.rules.min_gain):
            return None
        shown = ", ".join(f"{n} {k:.2f}x" for n, k in slowdowns.items())
        return self._adopt(placed, now, f"re-partitioned for slowdowns {shown}: bottleneck {current * 1e3:.1f} -> "
                                        f"{plan.bottleneck_s * 1e3:.1f} ms", plan)

    def eligible_problem(self) -> PlacementProblem | None:
        """The planner's view of every eligible node (for the hybrid planner, run outside the gateway's lock)."""
        nodes = self._stage_capable(self.eligible())  # the hybrid planner knows no ingest node
        return self._problem(nodes) if nodes else None

    def adopt_hybrid(self, plan: HybridPlan, now: float, reason: str) -> Placement | None:
        """Publish ``plan`` (one pipeline or parallel ones, stages replicated or not) when it moves something."""
        if self.current is not None and layout(plan) == [
                (s.pipeline, tuple(s.nodes), s.first_block, s.last_block) for s in self.current.stages]:
            return None
        nodes = [node for stages in plan.pipelines for s in stages for node in s.replicas]
        if not set(nodes) <= set(self.eligible()):  # a node left while the plan was being made
            return None
        placement = self._take_hybrid(plan, self._version(now), nodes, now, reason)
        # the plan may leave slow nodes out on purpose: do not re-place for them as if they had just joined
        self._declined = frozenset(self.eligible())
        return placement

    def _devices(self, nodes: list[str]) -> list[Device]:
        return [Device(n, mb_to_bytes(self._offers[n].memory_mb), self._offers[n].uplink_mbit_s * MBIT_BYTES)
                for n in nodes]

    def _problem(self, nodes: list[str], slowdowns: Mapping[str, float] | None = None) -> PlacementProblem:
        """The planner's view of ``nodes``: their profiles (stretched by measured ``slowdowns``) and decode costs."""
        slowdowns = slowdowns or {}
        # frame_megapixels 0: frames come at the model's size, their decode is noise, not a cost to plan for
        decode_s = {n: self._offers[n].decode.predict(self.frame_megapixels) for n in nodes
                    if self._offers[n].decode is not None and self.frame_megapixels > 0}
        blocks = {n: self._offers[n].profile.scaled(max(1.0, slowdowns.get(n, 1.0))).blocks for n in nodes}
        return problem_from_profiles(blocks, self._devices(nodes), frame_bytes=0, camera_bandwidth_bps=1.0,
                                     decode_s=decode_s)

    def _placed(self) -> list[str]:
        """The current placement's nodes: its stages' and its ingest node."""
        return self.current.all_nodes()

    def _ingest_only(self, nodes: list[str]) -> list[str]:
        return [n for n in nodes if self._offers[n].role == "ingest"]

    def _stage_capable(self, nodes: list[str]) -> list[str]:
        """``nodes`` without those of the ingest role, which never run a stage."""
        return [n for n in nodes if self._offers[n].role != "ingest"]

    def _cost_of_current(self, problem: PlacementProblem) -> Plan:
        return cost_with_ingest(problem, [(s.node_id, s.first_block, s.last_block) for s in self.current.stages],
                                self.current.ingest_node, self.input_bytes)

    def _plan(self, nodes: list[str]) -> Plan | None:
        return self._solved(nodes, lambda: plan_with_ingest(self._problem(nodes), self.input_bytes,
                                                            self._ingest_only(nodes), self.rules.min_gain))

    def _solved(self, nodes: list[str], solve: Callable[[], Plan | HybridPlan]) -> Plan | HybridPlan | None:
        """``solve()``, or None with the reason logged and kept in ``last_error`` (the page shows it)."""
        try:
            plan = solve()
        except (InfeasiblePlacement, ValueError) as exc:
            self.last_error = str(exc)
            log.error("cannot place the model on %s: %s", nodes, exc)
            return None
        self.last_error = None
        return plan

    def _plan_cost_of_current(self) -> float:
        """The current placement's bottleneck under today's profiles (they may have changed)."""
        return self._cost_of_current(self._problem(self._placed())).bottleneck_s

    def _ask(self, nodes: list[str], reason: str) -> PlanWanted:
        """The hybrid planner's question over ``nodes``: one pipeline or parallel ones, stages replicated or not
        (``min_parallel`` 2 for ``placement_mode = "parallel"``), or the whole model per node (data partitioning)."""
        capable = self._stage_capable(nodes)
        request = HybridRequest(self._problem(capable), self.hybrid.arrival_hz, self.hybrid.slo_s)
        basis = (tuple(nodes), tuple(self._offers[n] for n in nodes),
                 self.current.version if self.current else None, self.hybrid)
        return PlanWanted(basis, request, self.hybrid, tuple(nodes), reason)

    def _version(self, now: float) -> int:
        return max(int(now * 1000), self.seen_version + 1, (self.current.version + 1) if self.current else 0)

    def _take_hybrid(self, hybrid: HybridPlan, version: int, nodes: list[str], now: float, reason: str) -> Placement:
        """Make the ``hybrid`` plan over ``nodes`` the current placement (shared subscriptions share the token)."""
        self.current = hybrid_placement(hybrid, version, self.model, n_blocks=self._problem(nodes).n_blocks,
                                        issued_at=now, share_token=self._share_token)
        self._declined = None
        log.info("placement v%d (%s): hybrid plan (%s), %s, predicted sustainable %.1f frames/s", version, reason,
                 hybrid.kind, " | ".join(", ".join(f"{'+'.join(s.nodes)}:{s.first_block}-{s.last_block}" for s in p)
                                         for p in self.current.pipelines), hybrid.sustainable_hz)
        return self.current

    def _adopt(self, nodes: list[str], now: float, reason: str,
               plan: Plan | None = None) -> Placement | PlanWanted | None:
        if self.hybrid is not None and plan is None:
            return self._ask(nodes, reason)
        plan = plan or self._plan(nodes)
        if plan is None:
            return None
        version = self._version(now)
        self.current = plan.to_placement(version, self.model, issued_at=now)
        self._declined = None
        log.info("placement v%d (%s): %s%s, predicted bottleneck %.1f ms", version, reason,
                 f"{plan.ingest.device} ingests, " if plan.ingest else "",
                 ", ".join(f"{s.node_id}:{s.first_block}-{s.last_block}" for s in self.current.stages),
                 plan.bottleneck_s * 1e3)
        return self.current


def slowed_for_moves(slowdowns: Mapping[str, float], gone: float) -> dict[str, float]:
    """The slowdowns a re-partition plans for: a node counts as slowed only beyond ``gone`` (the controller's
    ``slowdown_gone``), else 1. Below it, a loaded host's noise (estimates of 1.2-2x) moved blocks back and forth
    before any slowdown began."""
    return {n: k if k > gone else 1.0 for n, k in slowdowns.items()}


def layout(plan: HybridPlan) -> list[tuple[int, tuple[str, ...], int, int]]:
    """``(pipeline, nodes, first_block, last_block)`` per stage of ``plan``: what its placement says."""
    return [(j, s.replicas, s.first_block, s.last_block) for j, stages in enumerate(plan.pipelines) for s in stages]


def input_of(placement: Placement | None, node_id: str) -> tuple | None:
    """What ``node_id`` reads under ``placement`` (:attr:`shared.schemas.Job.input`), None when it has no job."""
    job = placement.job_of(node_id) if placement is not None else None
    return None if job is None else job.input


class Handover:
    """Publishes a new placement only once every node that needs a new input for it is subscribed to it.

    Publishing a placement switches every stage at once: an upstream stage would send to a node that is still
    building its slice and subscribing (measured: a rejoining node was sent frames ~0.4 s before it subscribed,
    and they were lost). So the gateway first asks each node whose input changes (a node new to the pipeline or
    moving to another stage) to prepare; a node answers once the broker acknowledged its subscription
    (``prepared_version`` in its stats), and the placement is published when all have, or after ``timeout_s``
    (a node that cannot answer in time is then likely gone and re-placed around).
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.active: Placement | None = None   # the one published
        self.pending: Placement | None = None  # decided, waiting for nodes to prepare
        self.waiting: set[str] = set()
        self._since = 0.0

    def propose(self, placement: Placement, now: float) -> tuple[Placement | None, list[str]]:
        """A newly decided placement: (the placement to publish now, or None; the nodes to ask to prepare)."""
        self.waiting = {n for n in placement.all_nodes() if input_of(placement, n) != input_of(self.active, n)}
        self.pending, self._since = placement, now
        if not self.waiting:
            return self._activate(), []
        return None, sorted(self.waiting)

    def prepared(self, node_id: str, version: int) -> Placement | None:
        """A node is subscribed for ``version``; the placement to publish when it was the last one awaited."""
        if self.pending is None or version != self.pending.version or node_id not in self.waiting:
            return None
        self.waiting.discard(node_id)
        return None if self.waiting else self._activate()

    def expire(self, now: float) -> tuple[Placement | None, list[str]]:
        """After ``timeout_s``: (the pending placement to publish anyway, the nodes that never answered)."""
        if self.pending is None or now - self._since < self.timeout_s:
            return None, []
        late = sorted(self.waiting)
        return self._activate(), late

    def _activate(self) -> Placement:
        self.active, self.pending, self.waiting = self.pending, None, set()
        return self.active
def hybrid_placement(plan: HybridPlan, version: int, model: str, n_blocks: int, issued_at: float,
                     share_token: str) -> Placement:
    """A hybrid plan as the placement message: each stage's first replica is its ``node_id``, each pipeline's
    stages carry its number (0 for the first: one pipeline's placement is what it was before parallel ones)."""
    stages = [StageAssignment(stage=k, node_id=s.replicas[0], first_block=s.first_block, last_block=s.last_block,
                              replicas=list(s.replicas[1:]), pipeline=j)
              for j, pipeline in enumerate(plan.pipelines) for k, s in enumerate(pipeline, start=1)]
    shared = len(plan.pipelines) > 1 or any(s.replicas for s in stages)
    return Placement(version=version, model=model, n_blocks=n_blocks, stages=stages, issued_at=issued_at,
                     bottleneck_s=1.0 / plan.capacity_hz if plan.capacity_hz > 0 else None,
                     share_token=share_token if shared else None)


def whole_model_plan(request: HybridRequest) -> HybridPlan:
    """Data partitioning: one stage over every block, served by every device whose memory holds the model."""
    problem = request.problem
    need = problem.memory(0, problem.n_blocks)
    fitting = tuple(d.id for d in problem.devices if d.memory_bytes >= need)
    if not fitting:
        raise InfeasiblePlacement(f"no node holds the whole model ({need} bytes)")
    return evaluate(request, [[HybridStage(0, problem.n_blocks - 1, fitting)]])
