"""Compact read-only columns for a split's paths, labels and sizes, and their .npz file.

At a million entries a tuple of Python objects costs ~100 bytes per path and ~60 per size
pair, in every process that loads it (and in every forked worker that touches it: reference
counts write to the pages). Here a split is a few flat buffers: paths are one UTF-8 blob
plus end offsets and a small prefix table (the cache folder, the source root), labels
int16/int32, sizes two uint16/uint32 columns. They are kept as `bytes`/`array.array`: as
compact as numpy, but indexed from Python without numpy's per-call overhead, and never
scanned by the garbage collector. The sequences behave like the tuples they replace for
reading: `len`, indexing (numpy integers too), slicing (same type), iteration, `==` with any
sequence, `+` (a tuple), `index`/`count`/`in`, `np.asarray`; items are plain `str`, `int`
and `(h, w)` tuples of `int`, so hashes and keys built from them do not change.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence

import numpy as np

_TYPECODES = {np.dtype(t): c for t, c in ((np.int16, "h"), (np.int32, "i"), (np.int64, "q"),
                                          (np.uint8, "B"), (np.uint16, "H"), (np.uint32, "I"),
                                          (np.uint64, "Q"))}


def _small_dtype(max_value: int, signed: bool):
    for dt in ((np.int16, np.int32, np.int64) if signed else (np.uint16, np.uint32, np.uint64)):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"value {max_value} too large for a column")


def _pyarray(a: np.ndarray) -> array:
    a = np.ascontiguousarray(a)
    return array(_TYPECODES[a.dtype.newbyteorder("=")], a.astype(a.dtype.newbyteorder("="), copy=False).tobytes())


def _view(a: array) -> np.ndarray:
    v = np.frombuffer(a, dtype=np.dtype(a.typecode)) if len(a) else np.zeros(0, np.dtype(a.typecode))
    v.flags.writeable = False
    return v


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
    """A 1-D (items: int) or 2-D (items: tuple of ints) integer array as a read-only sequence."""

    def __init__(self, values: np.ndarray):
        a = np.asarray(values)
        self._cols = tuple(_pyarray(a[:, j]) for j in range(a.shape[1])) if a.ndim == 2 else (_pyarray(a),)
        self._flat = a.ndim == 1

    @classmethod
    def of(cls, values, width: int = 0, signed: bool = False) -> "Column":
        """A column from values (the smallest integer dtype that holds them)."""
        a = np.asarray(values, dtype=np.int64).reshape((-1, width) if width else (-1,))
        signed = signed or bool(a.size and a.min() < 0)
        top = int(np.abs(a).max()) if a.size else 0
        return cls(a.astype(_small_dtype(top, signed)))

    def __len__(self):
        return len(self._cols[0])

    @property
    def nbytes(self) -> int:
        return sum(c.itemsize * len(c) for c in self._cols)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Column(np.asarray(self)[i])
        if self._flat:
            return self._cols[0][i]
        return tuple(c[i] for c in self._cols)

    def __iter__(self):
        return iter(self._cols[0]) if self._flat else zip(*self._cols)

    def __array__(self, dtype=None, copy=None):
        a = _view(self._cols[0]) if self._flat else np.stack([_view(c) for c in self._cols], axis=1)
        return a if dtype is None else a.astype(dtype)

    def __eq__(self, other):
        if isinstance(other, Column):
            return self._flat == other._flat and self._cols == other._cols
        return super().__eq__(other)

    __hash__ = _ReadOnly.__hash__


class Paths(_ReadOnly):
    """Path strings stored as `prefixes[which[i]] + blob[ends[i-1]:ends[i]].decode()`."""

    def __init__(self, prefixes: tuple[str, ...], which: bytes, blob: bytes, ends: array):
        self._prefixes, self._which, self._blob, self._ends = tuple(prefixes), bytes(which), bytes(blob), ends

    @classmethod
    def encode(cls, rels: Iterable[str], which: Iterable[int], prefixes: tuple[str, ...]) -> "Paths":
        """Entry i is `prefixes[which[i]] + rels[i]`."""
        parts = [r.encode("utf-8", "surrogateescape") for r in rels]
        ends = np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)))
        top = int(ends[-1]) if len(ends) else 0
        which = np.asarray(which if isinstance(which, np.ndarray) else list(which), np.uint8)
        return cls(prefixes, which.tobytes(), b"".join(parts), _pyarray(ends.astype(_small_dtype(top, False))))

    def __len__(self):
        return len(self._ends)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + len(self._which) + self._ends.itemsize * len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._take(range(len(self))[i])
        e = self._ends
        b = e[i]                                    # IndexError / TypeError as for a tuple
        i = i + len(e) if i < 0 else i
        return self._prefixes[self._which[i]] + self._blob[e[i - 1] if i else 0:b].decode("utf-8", "surrogateescape")

    def _rel(self, i: int) -> str:
        return self._blob[self._ends[i - 1] if i else 0:self._ends[i]].decode("utf-8", "surrogateescape")

    def _take(self, idx: Sequence[int]) -> "Paths":
        return Paths.encode([self._rel(i) for i in idx], [self._which[i] for i in idx], self._prefixes)

    def __iter__(self):
        blob, pre, starts = self._blob, self._prefixes, 0
        for w, end in zip(self._which, self._ends):
            yield pre[w] + blob[starts:end].decode("utf-8", "surrogateescape")
            starts = end

    def __eq__(self, other):
        if isinstance(other, Paths) and other._prefixes == self._prefixes:
            return self._blob == other._blob and self._ends == other._ends and self._which == other._which
        return super().__eq__(other)

    __hash__ = _ReadOnly.__hash__


def save_columns(file, rels: list[str], which, labels, sizes) -> None:
    """Write one split's columns (uncompressed .npz) to `file` (the caller makes it atomic)."""
    paths = Paths.encode(rels, which, ())
    np.savez(file, which=np.frombuffer(paths._which, np.uint8), blob=np.frombuffer(paths._blob, np.uint8),
             ends=_view(paths._ends), labels=np.asarray(Column.of(labels, signed=True)),
             sizes=np.asarray(Column.of(sizes, width=2)).reshape(-1, 2))


def load_columns(path: str | os.PathLike, prefixes: tuple[str, ...]) -> tuple[Paths, Column, Column]:
    """(paths, labels, sizes) of a split written by `save_columns`."""
    with np.load(path) as z:
        paths = Paths(prefixes, z["which"].tobytes(), z["blob"].tobytes(), _pyarray(z["ends"]))
        labels, sizes = Column(z["labels"]), Column(z["sizes"].reshape(-1, 2))
    if not len(paths) == len(labels) == len(sizes) or (len(paths) and max(paths._which) >= len(prefixes)):
        raise ValueError(f"{path}: inconsistent columns")
    return paths, labels, sizes
