"""Device profiles: declarative Modbus register maps shared by the gateway and the simulator.

Load one with :func:`load_profile` (a TOML file) or :func:`builtin_profile` (shipped in
``gasguard/profiles/data``); read, serve and convert registers with :class:`RegisterMap`.
"""

from gasguard.profiles.model import (
    FLAG_TYPES,
    NUMERIC_TYPES,
    MeterSize,
    Order,
    Point,
    PointType,
    Profile,
    ProfileError,
    Table,
    builtin_profile,
    builtin_profile_names,
    load_profile,
)
from gasguard.profiles.registers import RegisterMap, bit_mask, decode_point, encode_point

__all__ = [
    "FLAG_TYPES",
    "NUMERIC_TYPES",
    "MeterSize",
    "Order",
    "Point",
    "PointType",
    "Profile",
    "ProfileError",
    "RegisterMap",
    "Table",
    "bit_mask",
    "builtin_profile",
    "builtin_profile_names",
    "decode_point",
    "encode_point",
    "load_profile",
]
