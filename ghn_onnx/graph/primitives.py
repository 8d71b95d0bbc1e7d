"""The 15 GHN-2 node primitives, in the exact order that fixes their embedding ids.

The order is that of ppuda's ``PRIMITIVES_DEEPNETS1M``; GHN-3 keeps it unchanged. The integer
value of each member is the row of the GHN's primitive embedding table, so never reorder.
"""

from __future__ import annotations

import enum


class Primitive(enum.IntEnum):
    MAX_POOL = 0
    AVG_POOL = 1
    SEP_CONV = 2
    DIL_CONV = 3
    CONV = 4
    MSA = 5
    CSE = 6
    SUM = 7
    CONCAT = 8
    INPUT = 9
    BIAS = 10
    BN = 11
    LN = 12
    POS_ENC = 13
    GLOB_AVG = 14

    @property
    def label(self) -> str:
        """The reference's lower-case name (``"sep_conv"``, ``"glob_avg"``, ...)."""
        return self.name.lower()


# Primitives whose nodes carry a convolution or linear weight, and the normalisations.
WEIGHT_PRIMITIVES = frozenset({Primitive.CONV, Primitive.SEP_CONV, Primitive.DIL_CONV})
NORM_PRIMITIVES = frozenset({Primitive.BN, Primitive.LN})
