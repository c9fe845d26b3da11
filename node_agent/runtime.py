"""What a node does with one request, free of MQTT: decode input, run the slice, encode output.

The transport (:mod:`node_agent.agent`) hands in raw payloads and publishes what comes back,
so this logic is tested without a broker.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from shared import wire
from shared.device_model import DeviceModel
from shared.imaging import decode_frame_and_image
from shared.latency_fit import LatencyCurve, fit_latency
from shared.model import BlockNet
from shared.pruning import PrunableSlice
from shared.settings import FRAME_LIMIT_BYTES
from shared.schemas import (INGEST_STAGE, MAX_LABEL_INDEX, TRUE_LABEL_PROPERTY, BadMessage, Hop, Result,
                            StageAssignment, to_json)


@dataclass
class Request:
    """One input as received: raw bytes plus what the transport knows about it."""

    topic: str
    payload: bytes
    user_props: dict[str, str]
    received_ts: float
    camera_id: str | None = None  # set for camera frames (stage 1)
    deferred: bool = False  # served late, after the timely requests (node_agent/deadline_queue.py)
    # read once on receipt (a frame's user properties, :func:`frame_metadata`; an activation's header) and kept
    request_id: str | None = None
    capture_ts: float | None = None
    # an activation this node made itself and runs on (serving.Server._finish_here): not a frame, even at stage 1
    activation: bool = False


@dataclass
class Output:
    topic: str
    payload: bytes
    request_id: str
    compute_s: float  # the slice alone, what pruning can shrink
    decode_s: float = 0.0  # turning the payload into the slice's input (a frame's decode at stage 1)
    user: dict[str, str] | None = None  # MQTT v5 user properties to publish with the output
    next_block: int | None = None  # the block an activation asks for next (None: a result)
    frame: Image.Image | None = None  # a camera frame as its decode reduced it: what its thumbnail is made of


def block_input_shape(model: BlockNet, block: int) -> tuple[int, ...]:
    """Shape (batch 1, full width) that ``block`` takes: untrusted activations are checked against it."""
    return block_input_shapes(model)[block]


def block_input_shapes(model: BlockNet) -> list[tuple[int, ...]]:
    """The input shape (batch 1, full width) of every block, from one pass through the model."""
    with torch.inference_mode():
        size = model.config.input_size
        x = torch.zeros(1, 3, size, size)
        shapes = []
        for block in range(model.n_blocks):
            shapes.append(tuple(x.shape))
            x = model.run_blocks(x, block, block)
        return shapes


class SliceCalibrator:
    """Measures the slice at every ladder ratio, one run per :meth:`step`, in the node's idle moments.

    :class:`node_agent.calibration.CalibrationSchedule` decides when to call :meth:`step`: after a
    short pause without requests (and at least once a second under load), so calibration never
    stalls serving, and each timed run follows a pause as live requests do: a hot loop measures
    caches and clocks that a request arriving after a pause does not find (here +0.5 ms a call,
    which on a small pruned slice would read as a fivefold slowdown and keep the controller from
    ever restoring it).
    """

    def __init__(self, prunable: PrunableSlice, input_shape: tuple[int, ...], repeats: int = 5,
                 device_model: DeviceModel | None = None):
        """With a ``device_model`` (an emulated device, in a benchmark) a run takes at least the model's time, as a
        request would on that device: the node calibrates the device it emulates, as it would a real one."""
        self.prunable = prunable
        self.device_model = device_model
        self.ladder = prunable.ladder
        self.x = torch.zeros(input_shape)
        self.repeats = repeats
        self._runs: list[tuple[float, bool]] = [(r, timed) for r in prunable.ladder
                                                 for timed in [False] + [True] * repeats]
        self._times: dict[float, list[float]] = {r: [] for r in prunable.ladder}

    @property
    def done(self) -> bool:
        return not self._runs

    def step(self) -> bool:
        """One run (the first per ratio untimed: it allocates); True once every ratio is measured."""
        if self._runs:
            ratio, timed = self._runs.pop(0)
            module = self.prunable.module(ratio)
            with torch.inference_mode():
                t0 = time.perf_counter()
                module(self.x)
                elapsed = time.perf_counter() - t0
            if self.device_model is not None:
                elapsed = max(elapsed, self.device_model.time_s(self.prunable.first_block, self.prunable.last_block,
                                                                ratio))
            if timed:
                self._times[ratio].append(elapsed)
        return self.done

    def latencies(self) -> list[float]:
        """Median seconds per ladder ratio (after :attr:`done`)."""
        return [float(np.median(self._times[r])) for r in self.prunable.ladder]


def frame_metadata(req: Request) -> tuple[str, float]:
    """Request id and capture time of a camera frame: from MQTT v5 user properties, else made here. Read once and
    kept on the request, so the node's admission (which may correct the time) and the decode agree."""
    if req.request_id is None:
        req.request_id, req.capture_ts = _read_frame_metadata(req)
    return req.request_id, req.capture_ts


def _read_frame_metadata(req: Request) -> tuple[str, float]:
    request_id = req.user_props.get("request_id") or f"{req.camera_id}-{uuid.uuid4().hex[:12]}"
    if len(request_id) > 128:
        raise BadMessage("bad_header", "request_id user property longer than 128 characters")
    raw_ts = req.user_props.get("capture_ts")
    if raw_ts is None:
        return request_id, req.received_ts
    try:
        capture_ts = float(raw_ts)
    except ValueError:
        raise BadMessage("bad_header", f"capture_ts user property {raw_ts[:40]!r} is not a number") from None
    if not math.isfinite(capture_ts) or capture_ts <= 0:
        raise BadMessage("bad_header", f"capture_ts {raw_ts[:40]!r} is not a valid epoch time")
    return request_id, capture_ts


def plausible_capture(capture_ts: float, received_ts: float, past_s: float, future_s: float) -> bool:
    """A capture time a camera's clock could give: not far before arrival, not after it (beyond skew)."""
    return received_ts - past_s <= capture_ts <= received_ts + future_s


def true_label(props: dict[str, str]) -> int | None:
    """The ground-truth class index a labelled test frame carries (user property ``true_label``), if any."""
    raw = props.get(TRUE_LABEL_PROPERTY)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 4:
        raise BadMessage("bad_header", f"true_label user property {raw[:40]!r} is not a class index "
                         f"(0..{MAX_LABEL_INDEX})")
    return int(raw)


def label_property(label: int | None) -> dict[str, str] | None:
    """The user property that carries a labelled frame's ground truth on to the next stage."""
    return {TRUE_LABEL_PROPERTY: str(label)} if label is not None else None


def _check_size(payload: bytes, limit: int) -> None:
    if len(payload) > limit:
        raise BadMessage("oversized", f"payload of {len(payload)} B exceeds the node limit of {limit} B")


def frame_activation(req: Request, preprocessing: dict, reduced: bool) -> tuple[wire.Activation, Image.Image]:
    """A camera frame as block 0's input, through the one decode path (:mod:`shared.imaging`), and the image
    that decode reduced it from (for its thumbnail)."""
    request_id, capture_ts = frame_metadata(req)
    pixels, frame = decode_frame_and_image(req.payload, **preprocessing, reduced=reduced)
    return wire.Activation(request_id, req.camera_id or "unknown", capture_ts, 0, pixels), frame


class IngestRuntime:
    """Decodes camera frames on a node of their own and sends stage 1 the model-sized input.

    Where frames are large, decoding costs far more than any slice (docs/decode.md): the planner
    may give it to a node that runs no slice (the placement's ``ingest_node``). The input goes on
    as a float32 activation for block 0, the very tensor stage 1 would have decoded itself, with
    this node's hop (stage 0, its ``decode_s``) first in the hop record.
    """

    takes_frames = True

    def __init__(self, model: BlockNet, node_id: str, output_topic: str, max_payload_bytes: int = FRAME_LIMIT_BYTES,
                 reduced_decode: bool = True):
        self.node_id = node_id
        self.output_topic = output_topic
        self.max_payload_bytes = max_payload_bytes
        self.reduced_decode = reduced_decode
        self.preprocessing = model.config.preprocessing()

    def check_size(self, payload: bytes) -> None:
        _check_size(payload, self.max_payload_bytes)

    def run(self, req: Request, started_ts: float, slowdown: float = 1.0) -> Output:
        """Decode one frame (``slowdown`` emulates slower slices only: decode is left alone, as in a stage)."""
        t_decode = time.perf_counter()
        act, frame = frame_activation(req, self.preprocessing, self.reduced_decode)
        label = true_label(req.user_props)
        decode_s = time.perf_counter() - t_decode
        finished_ts = started_ts + decode_s
        act.hops = [Hop(stage=INGEST_STAGE, node_id=self.node_id, prune_ratio=0.0, received_ts=req.received_ts,
                        started_ts=started_ts, finished_ts=finished_ts, published_ts=finished_ts,
                        decode_s=decode_s, deferred=req.deferred)]
        return Output(self.output_topic, wire.encode(act, stamp=time.time), act.request_id, 0.0, decode_s,
                      label_property(label), 0, frame)


class StageRuntime:
    """Runs one pipeline stage as assigned by the placement.

    While the placement moves, an activation may come for another block than the stage's first: its
    upstream ran under the old placement, or this node does (frames queued before the move). Every node
    holds the whole model, so the stage serves it rather than fail it (:meth:`forward`); the hop records
    the blocks that ran (``first_block``, ``n_blocks``).
    """

    def __init__(self, model: BlockNet, node_id: str, assignment: StageAssignment, n_stages: int,
                 output_topic: str, wire_dtype: str = "float16",
                 max_payload_bytes: int = FRAME_LIMIT_BYTES, reduced_decode: bool = True, behind_ingest: bool = False,
                 device_model: DeviceModel | None = None):
        self.node_id = node_id
        self.assignment = assignment
        self.is_first = assignment.stage == 1
        self.is_last = assignment.stage == n_stages
        # stage 1 decodes camera frames itself unless an ingest node sends it the decoded input
        self.takes_frames = self.is_first and not behind_ingest
        self.output_topic = output_topic
        self.wire_dtype = np.dtype(wire_dtype)
        self.max_payload_bytes = max_payload_bytes
        self.reduced_decode = reduced_decode
        # every ladder variant is built in the background; the full slice serves meanwhile
        self.slice = PrunableSlice(model, assignment.first_block, assignment.last_block, build="lazy",
                                   input_size=model.config.input_size)
        self.model = model  # the whole model: the blocks outside the slice that a move may bring (forward)
        # class names and input decoding travel in the checkpoint (TrapNetConfig), never a constant
        self.class_names = model.config.class_names
        self.scientific_names = model.config.scientific_names
        self.preprocessing = model.config.preprocessing()
        self.block_shapes = block_input_shapes(model)
        self.input_shape = self.block_shapes[assignment.first_block]
        # the unslowed compute curve fitted to this node's calibration of the slice (None until calibrated)
        self.calibrated_curve: LatencyCurve | None = None
        # with a device model, the emulated device is the model's, never this run's own calibration
        self.device_model = device_model

    def use_calibration(self, latencies_s: Sequence[float]) -> None:
        """Fit the slice's calibration (one median per ladder ratio) as the controller does, to emulate from.

        The gateway predicts this slice's time from the same fit (``shared.latency_fit``), so an emulated
        slowdown is as slow as the controller expects rather than as slow as one sample taken while the
        machine was busy (such a sample made a pruned slice 1.8x slower than predicted). A calibration
        neither fit describes (the gateway refuses it too) leaves the emulation as it was.
        """
        try:
            self.calibrated_curve = fit_latency(self.slice.ladder, latencies_s).best()
        except ValueError:
            pass

    def check_size(self, payload: bytes) -> None:
        _check_size(payload, self.max_payload_bytes)

    def decode(self, req: Request) -> tuple[wire.Activation, Image.Image | None]:
        """Turn a raw input into an activation at full channel width (BadMessage if malformed), with the decoded
        image if it was a camera frame. Its size was checked on receipt (:meth:`check_size`)."""
        if self.takes_frames and not req.activation:
            return frame_activation(req, self.preprocessing, self.reduced_decode)
        act = wire.decode(req.payload)
        block = act.next_block
        if block >= len(self.block_shapes) or (self.is_last and block > self.assignment.last_block):
            raise BadMessage("stale_placement", f"activation for block {block} reached the stage of blocks "
                             f"{self.assignment.first_block}..{self.assignment.last_block}, which cannot run "
                             f"or forward it")
        full_shape = (act.tensor.shape[0], *(act.keep_mask.shape if act.keep_mask is not None
                                             else act.tensor.shape[1:2]), *act.tensor.shape[2:])
        if full_shape != self.block_shapes[block]:
            raise BadMessage("bad_shape", f"activation of shape {full_shape} does not fit block "
                             f"{block}, which takes {self.block_shapes[block]}")
        return act, None

    def blocks_run(self, block: int) -> tuple[int, int]:
        """(first block, how many) this stage runs for an activation that asks for ``block`` (:meth:`forward`);
        its output asks for the sum."""
        return block, max(0, self.assignment.last_block + 1 - block)

    def forward(self, x: torch.Tensor, act: wire.Activation) -> tuple[torch.Tensor, np.ndarray | None]:
        """This stage's output for ``act`` (full-width input ``x``), whichever block it asks for:

        - its first block: the slice, at its ratio (entry statistics for the incoming keep mask);
        - an earlier one (the upstream ran fewer blocks): those blocks at full width, then the slice,
          conditioned on an unpruned upstream;
        - a later one within the slice (the upstream ran more): the rest of the slice at full width,
          from the zero-filled input as the slice's own first block would take it;
        - past the slice (the activation has run this stage's blocks already): forwarded unchanged.
        """
        first, last = self.assignment.first_block, self.assignment.last_block
        block = act.next_block
        if block == first:
            return self.slice.forward(x, act.keep_mask)
        if block > last:
            return torch.from_numpy(np.array(act.tensor, dtype=np.float32)), act.keep_mask
        with torch.inference_mode():
            if block > first:
                return self.model.run_blocks(x, block, last), None
            return self.slice.forward(self.model.run_blocks(x, block, first - 1), None)

    def emulated_s(self, block: int) -> float:
        """The device model's time for what :meth:`forward` runs for an activation asking for ``block``: the slice
        at its ratio, with any blocks before it or only the rest of it at full width, or nothing (forwarded)."""
        first, last = self.assignment.first_block, self.assignment.last_block
        if block > last:
            return 0.0
        if block > first:
            return self.device_model.time_s(block, last, 0.0)
        earlier = self.device_model.time_s(block, first - 1, 0.0) if block < first else 0.0
        return earlier + self.device_model.time_s(first, last, self.slice.ratio)

    def run(self, req: Request, started_ts: float, slowdown: float = 1.0) -> Output:
        """One request through this stage; ``slowdown`` > 1 emulates a busier device.

        With a device model (a benchmark's), the compute takes exactly ``slowdown`` × the model's time
        of the blocks at the current ratio: the slice runs, then the stage sleeps the rest (none if the
        run alone took longer), so every run of a benchmark emulates the same device. Without one, the
        emulated device does ``slowdown - 1`` extra units of the slice's *calibrated* compute
        at the current ratio, read from the fitted curve (of this request's own compute until
        calibrated): stretching each request's measured time instead would multiply this machine's
        scheduling jitter too (a 10 ms preemption became 0.6 s at 60x and stalled a demo's queue
        for seconds).
        The input's decode is timed apart (``decode_s``; the emulation leaves it alone) and the hop's
        ``finished_ts`` covers decode and compute, and ``published_ts`` is read once the output is built (an
        activation's bytes but their final join, a result's record but its JSON text), so no time is booked as
        transfer that was spent here.
        """
        t_decode = time.perf_counter()
        act, frame = self.decode(req)
        label = true_label(req.user_props)
        first_block, n_blocks = self.blocks_run(act.next_block)
        x = torch.from_numpy(np.array(act.full_tensor(), dtype=np.float32))  # a writable copy
        decode_s = time.perf_counter() - t_decode
        t0 = time.perf_counter()
        out, keep_mask = self.forward(x, act)
        if self.device_model is not None:
            target = slowdown * self.emulated_s(act.next_block)
            time.sleep(max(0.0, target - (time.perf_counter() - t0)))
        elif slowdown > 1.0:
            curve = self.calibrated_curve
            unit = curve.predict(self.slice.ratio) if curve is not None else time.perf_counter() - t0
            time.sleep((slowdown - 1.0) * unit)
        compute_s = time.perf_counter() - t0
        finished_ts = started_ts + decode_s + compute_s
        hop = {"stage": self.assignment.stage, "node_id": self.node_id, "prune_ratio": self.slice.ratio,
               "received_ts": req.received_ts, "started_ts": started_ts, "finished_ts": finished_ts,
               "decode_s": decode_s, "deferred": req.deferred, "first_block": first_block, "n_blocks": n_blocks}
        own = Hop(**hop, published_ts=finished_ts)  # published_ts stamped once the output is made (below)
        if self.is_last:
            probs = torch.softmax(out.float(), dim=1)[0]
            index = int(torch.argmax(probs))
            result = Result(request_id=act.request_id, camera_id=act.camera_id, capture_ts=act.capture_ts,
                            label=self.class_names[index], scientific_name=self.scientific_names[index],
                            label_index=index, confidence=float(probs[index]), hops=[*act.hops, own],
                            true_label=label)
            stamped = own.model_copy(update={"published_ts": time.time()})  # only the JSON text follows
            payload = to_json(result.model_copy(update={"hops": [*act.hops, stamped]}))
        else:
            nxt = wire.Activation(act.request_id, act.camera_id, act.capture_ts,
                                  first_block + n_blocks, out.numpy().astype(self.wire_dtype),
                                  keep_mask, [*act.hops, own])
            payload = wire.encode(nxt, stamp=time.time)
        return Output(self.output_topic, payload, act.request_id, compute_s, decode_s,
                      None if self.is_last else label_property(label), None if self.is_last else first_block + n_blocks,
                      frame)
