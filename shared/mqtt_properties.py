"""paho-mqtt's MQTT v5 property tables, made once instead of for every packet.

paho-mqtt 2.x builds the tables of ``Properties`` (each property's name, id, type and packet types: two dicts of
~30 entries and ~30 ``list.index`` calls) in its ``__init__``, and makes a ``Properties`` for every PUBLISH it
decodes. That was 40% of the central collector's CPU per result (179 -> 104-113 µs, docs/scaling.md "Measured").
The tables are constants, so they are made once, read-only (shared, nobody may change them for everybody), and
``Properties.__init__`` only points at them. ``clear`` (run by every ``unpack``) walked those tables too, a
``str.replace`` and a ``hasattr`` per known property: it now drops the instance's own attributes, which are the
properties (paho's ``__setattr__`` admits no others). Everything else about ``Properties`` stays paho's.
:mod:`shared.bus` installs it; a paho whose ``Properties.__init__`` makes more than these tables is left alone
(logged).
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

TABLES = {"packetType", "types", "names", "properties"}


def install() -> bool:
    """Make ``Properties`` share its tables; False (and paho unchanged) if its ``__init__`` is not the known one."""
    if getattr(Properties.__init__, "shares_tables", False):
        return True
    made = Properties(PacketTypes.PUBLISH)
    if set(vars(made)) != TABLES:
        log.warning("paho-mqtt's Properties makes %s: its tables stay per packet", sorted(vars(made)))
        return False
    types = tuple(made.types)
    names = MappingProxyType(dict(made.names))
    properties = MappingProxyType({ident: (kind, tuple(packets)) for ident, (kind, packets) in made.properties.items()})

    def __init__(self, packetType):
        set_table = object.__setattr__  # as paho's own __setattr__ does for these four
        set_table(self, "packetType", packetType)
        set_table(self, "types", types)
        set_table(self, "names", names)
        set_table(self, "properties", properties)

    def clear(self):
        for name in [name for name in vars(self) if name not in TABLES]:
            delattr(self, name)

    __init__.shares_tables = clear.shares_tables = True  # type: ignore[attr-defined]
    Properties.__init__ = __init__
    Properties.clear = clear
    return True
