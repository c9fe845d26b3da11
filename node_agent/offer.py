"""What a node offers the planner (its ``NodeProfile``): every block's time on this device, its frame decode cost,
memory and uplink; measured once at start, before the node takes any work."""

from __future__ import annotations

import logging

from shared.device_model import DeviceModel
from shared.imaging import measure_decode_cost
from shared.model import MODEL_NAME, BlockNet, model_fingerprint
from shared.profiling import ProfileError, load_profile, profile_model
from shared.schemas import NodeProfile
from shared.settings import NodeSettings

log = logging.getLogger(__name__)


def total_memory_mb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no MemTotal in /proc/meminfo")


def measure_offer(settings: NodeSettings, model: BlockNet, device_model: DeviceModel | None,
                  slowdown: float) -> NodeProfile:
    """Profile every block on this device (the planner's input), before taking any work.

    A configured profile file is offered instead (:class:`ProfileError` if it describes another
    model): the same file on every start gives the same placement, measuring noise cannot move it.
    The frame decode cost is always measured here, on the decode path this node will serve with.
    """
    if settings.profile is not None:
        profile = load_profile(settings.profile)
        names = [b.name for b in profile.blocks]
        if profile.model != MODEL_NAME or names != list(model.block_names):
            raise ProfileError(f"{settings.profile}: profile of {profile.model} blocks {names}, this node "
                               f"runs {MODEL_NAME} blocks {list(model.block_names)}")
        source = f"from {settings.profile}"
    else:
        profile = profile_model(model, threads=settings.threads, repeats=settings.profile_repeats,
                                wire_dtype=settings.wire_dtype)
        source = "measured"
    if device_model is not None:  # emulated: offer the times this node will serve with, as a real one does
        profile = profile.model_copy(update={"blocks": [
            b.model_copy(update={"latency_s": device_model.time_s(i, i, 0.0)})
            for i, b in enumerate(profile.blocks)]})
        source += ", times from the device model"
    profile = profile.scaled(slowdown)
    decode = measure_decode_cost(reduced=settings.reduced_decode)
    memory_mb = settings.memory_mb or total_memory_mb() / 2
    log.info("%s: %d blocks profiled (%s), %.1f ms in all; a frame decodes in %.1f ms + %.1f ms/MP", settings.node_id,
             len(profile.blocks), source, 1e3 * sum(b.latency_s for b in profile.blocks), 1e3 * decode.fixed_s,
             1e3 * decode.per_megapixel_s)
    return NodeProfile(node_id=settings.node_id, model_fingerprint=model_fingerprint(model),
                       memory_mb=memory_mb, uplink_mbit_s=settings.uplink_mbit_s, profile=profile,
                       decode=decode, role=settings.role)
