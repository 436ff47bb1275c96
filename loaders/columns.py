"""Compact read-only columns for a split's paths, labels and sizes, and their .npz file.

At a million entries a tuple of Python objects costs ~100 bytes per path and ~60 per size
pair, in every process that loads it (and in every forked worker that touches it: reference
counts write to the pages). Here a split is a handful of numpy arrays: paths are one UTF-8
blob plus end offsets and a small prefix table (the cache folder, the source root), labels
int16/int32, sizes (N, 2) uint16/uint32. The sequences behave like the tuples they replace
for reading: `len`, indexing (numpy integers too), slicing (same type), iteration, `==`
with any sequence, `+` (a tuple), `index`/`count`/`in`; items are plain `str`, `int` and
`(h, w)` tuples of `int`, so hashes and keys built from them do not change.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence

import numpy as np

_ITER_CHUNK = 65536


def _small_dtype(max_value: int, signed: bool):
    for dt in ((np.int16, np.int32, np.int64) if signed else (np.uint16, np.uint32, np.uint64)):
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"value {max_value} too large for a column")


class _ReadOnly(Sequence):
    """What the tuples gave: equality with any sequence, `+`, a hash that agrees with tuple's."""

    def __eq__(self, other):
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __hash__(self):
        return hash(tuple(self))

    def __add__(self, other):
        return tuple(self) + tuple(other)

    def __radd__(self, other):
        return tuple(other) + tuple(self)

    def __repr__(self):
        head = ", ".join(repr(v) for v in self[:3])
        return f"{type(self).__name__}([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class Column(_ReadOnly):
    """A 1-D (items: int) or 2-D (items: tuple of ints) numpy array as a read-only sequence."""

    def __init__(self, array: np.ndarray):
        self._a = np.asarray(array)
        self._a.setflags(write=False)

    @classmethod
    def of(cls, values, width: int = 0, signed: bool = False) -> "Column":
        """A column from Python values (the smallest integer dtype that holds them)."""
        a = np.asarray(values, dtype=np.int64).reshape((-1, width) if width else (-1,))
        signed = signed or bool(a.size and a.min() < 0)
        top = int(np.abs(a).max()) if a.size else 0
        return cls(a.astype(_small_dtype(top, signed)))

    def __len__(self):
        return len(self._a)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Column(self._a[i])
        row = self._a[operator.index(i)]
        return row.item() if self._a.ndim == 1 else tuple(row.tolist())

    def __iter__(self):
        for s in range(0, len(self._a), _ITER_CHUNK):
            part = self._a[s:s + _ITER_CHUNK].tolist()
            yield from (part if self._a.ndim == 1 else map(tuple, part))

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)

    def __eq__(self, other):
        if isinstance(other, Column):
            return self._a.shape == other._a.shape and bool(np.array_equal(self._a, other._a))
        return super().__eq__(other)

    __hash__ = _ReadOnly.__hash__


class Paths(_ReadOnly):
    """Path strings stored as `prefixes[which[i]] + blob[ends[i-1]:ends[i]].decode()`."""

    def __init__(self, prefixes: tuple[str, ...], which: np.ndarray, blob: bytes, ends: np.ndarray):
        self._prefixes, self._which, self._blob, self._ends = tuple(prefixes), which, bytes(blob), ends

    @classmethod
    def encode(cls, rels: Iterable[str], which: Iterable[int], prefixes: tuple[str, ...]) -> "Paths":
        """Entry i is `prefixes[which[i]] + rels[i]`."""
        parts = [r.encode("utf-8", "surrogateescape") for r in rels]
        ends = np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)))
        top = int(ends[-1]) if len(ends) else 0
        return cls(prefixes, np.asarray(list(which) if not isinstance(which, np.ndarray) else which, np.uint8),
                   b"".join(parts), ends.astype(_small_dtype(top, False)))

    def __len__(self):
        return len(self._ends)

    def _span(self, i: int) -> tuple[int, int]:
        return (self._ends.item(i - 1) if i else 0), self._ends.item(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._take(range(len(self))[i])
        n, i = len(self._ends), operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("Paths index out of range")
        a, b = self._span(i)
        return self._prefixes[self._which.item(i)] + self._blob[a:b].decode("utf-8", "surrogateescape")

    def _take(self, idx: Sequence[int]) -> "Paths":
        rels = [self._blob[slice(*self._span(i))].decode("utf-8", "surrogateescape") for i in idx]
        return Paths.encode(rels, self._which[np.asarray(idx, np.int64)], self._prefixes)

    def __iter__(self):
        blob, pre = self._blob, self._prefixes
        for s in range(0, len(self._ends), _ITER_CHUNK):
            ends = self._ends[s:s + _ITER_CHUNK].tolist()
            starts = [self._ends.item(s - 1) if s else 0] + ends[:-1]
            for w, a, b in zip(self._which[s:s + _ITER_CHUNK].tolist(), starts, ends):
                yield pre[w] + blob[a:b].decode("utf-8", "surrogateescape")

    def __eq__(self, other):
        if isinstance(other, Paths) and other._prefixes == self._prefixes:
            return (self._blob == other._blob and np.array_equal(self._ends, other._ends)
                    and np.array_equal(self._which, other._which))
        return super().__eq__(other)

    __hash__ = _ReadOnly.__hash__


def save_columns(path: str | os.PathLike, rels: list[str], which, labels, sizes) -> None:
    """Write one split's columns (uncompressed .npz) to `path` (the caller makes it atomic)."""
    paths = Paths.encode(rels, which, ())
    np.savez(path, which=paths._which, blob=np.frombuffer(paths._blob, np.uint8), ends=paths._ends,
             labels=Column.of(labels, signed=True)._a, sizes=Column.of(sizes, width=2)._a)


def load_columns(path: str | os.PathLike, prefixes: tuple[str, ...]) -> tuple[Paths, Column, Column]:
    """(paths, labels, sizes) of a split written by `save_columns`."""
    with np.load(path) as z:
        paths = Paths(prefixes, z["which"], z["blob"].tobytes(), z["ends"])
        labels, sizes = Column(z["labels"]), Column(z["sizes"])
    if not len(paths) == len(labels) == len(sizes) or (len(paths) and int(paths._which.max()) >= len(prefixes)):
        raise ValueError(f"{path}: inconsistent columns")
    return paths, labels, sizes
