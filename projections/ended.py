"""The ids of compacted ended runs, held in 16 bytes each.

A worker keeps the id of every run that ended for good and left the
compaction window (`PartitionRuns.ended`), so a repeated trigger or a late
copy of one of its events changes nothing. Held as a set of strings that
is about 130 bytes per run, forever. Here an id of the engine's format
(`run_` + 26 Crockford base32 digits, engine/core/ids.py: a ULID, or the
first 126 bits of a digest for derived ids) is its 128-bit value, which
the format maps one to one: no two ids share a value, so membership is
exact, never a false positive that could drop a live run's event. An id
of any other form (tests, ids written by hand) is kept as a string.

Values sit in a few sorted levels of two `array('Q')` halves (high, low
64 bits), the newest in a small set first; the set is sorted into a level
when it fills, and levels are merged when one is no bigger than the next
(as an LSM tree does), so each value is merged a logarithmic number of
times and a lookup bisects a logarithmic number of levels.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Set

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Crockford digits to the digits int(x, 32) reads.
_TO_INT = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_FORMAT = re.compile(r"run_[0-7][0-9A-HJKMNP-TV-Z]{25}")
_MASK = (1 << 64) - 1
# Values waiting in a set before they are sorted into a level: a lookup
# there is a hash, and a sort of this many costs well under a millisecond.
TAIL = 2048


def id_value(run_id: str) -> int | None:
    """The 128-bit value of a run id of the engine's format, else None.

    The first digit is at most 7: 26 digits hold 130 bits, the engine's ids
    use 128 (so the value is below 2**128 and turns back into the same id).
    """
    if len(run_id) != 30 or _FORMAT.fullmatch(run_id) is None:
        return None
    return int(run_id[4:].translate(_TO_INT), 32)


def value_id(value: int) -> str:
    """The run id of a value `id_value` gave."""
    digits = []
    for _ in range(26):
        digits.append(_ALPHABET[value & 31])
        value >>= 5
    return "run_" + "".join(reversed(digits))


class _Level:
    __slots__ = ("hi", "lo")

    def __init__(self, values: list[int]) -> None:
        """`values` sorted, without repeats."""
        self.hi = array("Q", [v >> 64 for v in values])
        self.lo = array("Q", [v & _MASK for v in values])

    def __len__(self) -> int:
        return len(self.hi)

    def __contains__(self, value: int) -> bool:
        hi, lo = self.hi, self.lo
        h, low = value >> 64, value & _MASK
        i = bisect_left(hi, h)
        n = len(hi)
        # Ids made in the same millisecond share their high half.
        while i < n and hi[i] == h:
            if lo[i] == low:
                return True
            i += 1
        return False

    def values(self) -> list[int]:
        return [(h << 64) | low for h, low in zip(self.hi, self.lo, strict=True)]


class EndedIds(Set[str]):
    """A growing set of run ids: `add`, `update`, `in`, `len`, iteration (as strings)."""

    __slots__ = ("_levels", "_tail", "_other", "_count")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._levels: list[_Level] = []
        self._tail: set[int] = set()
        self._other: set[str] = set()
        self._count = 0
        self.update(ids)

    def __contains__(self, run_id: object) -> bool:
        if not isinstance(run_id, str):
            return False
        value = id_value(run_id)
        if value is None:
            return run_id in self._other
        return self._has(value)

    def _has(self, value: int) -> bool:
        if value in self._tail:
            return True
        return any(value in level for level in self._levels)

    def add(self, run_id: str) -> None:
        value = id_value(run_id)
        if value is None:
            if run_id not in self._other:
                self._other.add(run_id)
                self._count += 1
            return
        if self._has(value):
            return
        self._tail.add(value)
        self._count += 1
        if len(self._tail) >= TAIL:
            self._flush()

    def update(self, ids: Iterable[str]) -> None:
        for run_id in ids:
            self.add(run_id)

    def _flush(self) -> None:
        """Sort the tail into a level, then merge levels while the newest is
        at least half the size of the one before it."""
        if not self._tail:
            return
        values = sorted(self._tail)
        self._tail = set()
        levels = self._levels
        while levels and len(levels[-1]) <= 2 * len(values):
            # Two sorted runs: timsort merges them in linear time.
            values = sorted(levels.pop().values() + values)
        levels.append(_Level(values))

    def __len__(self) -> int:
        return self._count

    def copy(self) -> EndedIds:
        """A copy later additions leave alone (levels are never changed, only replaced)."""
        out = EndedIds()
        out._levels, out._tail, out._other = list(self._levels), set(self._tail), set(self._other)
        out._count = self._count
        return out

    def __iter__(self) -> Iterator[str]:
        for level in self._levels:
            for value in level.values():
                yield value_id(value)
        for value in self._tail:
            yield value_id(value)
        yield from self._other

    def __repr__(self) -> str:
        return f"EndedIds({len(self)} ids)"

    # --- snapshots ---

    def packed(self) -> tuple[bytes, list[str]]:
        """(the values, sorted, 16 bytes big-endian each; the other ids, sorted).
        Changes nothing: a copy may be packed in another thread."""
        values = sorted([v for level in self._levels for v in level.values()] + list(self._tail))
        return b"".join(v.to_bytes(16, "big") for v in values), sorted(self._other)

    @classmethod
    def unpacked(cls, data: bytes, other: Iterable[str]) -> EndedIds:
        """The inverse of `packed`; ValueError when `data` is not whole values."""
        if len(data) % 16:
            raise ValueError(f"{len(data)} bytes of ended run ids is not a whole number of 16-byte ids")
        out = cls()
        values = sorted({int.from_bytes(data[i : i + 16], "big") for i in range(0, len(data), 16)})
        if values:
            out._levels.append(_Level(values))
        out._count = len(values)
        out.update(other)
        return out
