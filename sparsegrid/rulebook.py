"""Rulebook: the plain-array form of a sparse convolution's (input, output, offset) pairs.

Pairs are grouped by kernel offset: the pairs of offset ``k`` are
``in_idx[offset_ptr[k]:offset_ptr[k+1]]`` and ``out_idx[...]`` (int32 rows). Within one
offset every output row and every input row appears at most once, for every kind of
convolution, so gather-GEMM-scatter needs neither atomics nor ``np.add.at``.
"""

from __future__ import annotations

import numpy as np

from . import backend

_FIELDS = ("in_idx", "out_idx", "offset_ptr")
_META = ("n_in", "n_out", "filter_size", "stride", "dilation", "kind", "identity_offset",
         "transposed")


class Rulebook:
    """Pairs of a sparse convolution, grouped by kernel offset.

    Attributes
    ----------
    in_idx, out_idx : int32 (P,)
    offset_ptr : int64 (K + 1,)
    n_in, n_out : int
        Row counts of the input and output site sets.
    filter_size, stride, dilation : tuple of int
    kind : str
        ``'submanifold'``, ``'strided'`` or ``'full'``.
    identity_offset : int
        Offset whose pairs are ``(r, r)`` for every row, in row order (the submanifold
        centre for odd filters), else -1; kernels skip its gather and scatter.
    transposed : bool
        True when input and output were swapped (Deconvolution, UnPooling, gradients).
    """

    __slots__ = _FIELDS + _META + ("_derived",)

    def __init__(self, in_idx, out_idx, offset_ptr, n_in, n_out, filter_size, *, stride=None,
                 dilation=None, kind="submanifold", identity_offset=-1, transposed=False):
        self.in_idx = in_idx
        self.out_idx = out_idx
        self.offset_ptr = offset_ptr
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.filter_size = tuple(int(f) for f in filter_size)
        ones = (1,) * len(self.filter_size)
        self.stride = tuple(int(s) for s in stride) if stride is not None else ones
        self.dilation = tuple(int(d) for d in dilation) if dilation is not None else ones
        self.kind = kind
        self.identity_offset = int(identity_offset)
        self.transposed = bool(transposed)
        self._derived = {}

    def derived(self, name, build):
        """A cached value computed from this rulebook (kernel plans, its transpose)."""
        value = self._derived.get(name)
        if value is None:
            value = self._derived[name] = build()
        return value

    def has_derived(self, name):
        """Whether :meth:`derived` already holds ``name``."""
        return name in self._derived

    @property
    def n_offsets(self):
        """K, the number of kernel offsets."""
        return len(self.offset_ptr) - 1

    @property
    def n_pairs(self):
        return len(self.in_idx)

    def counts(self):
        """Number of pairs of each offset, int64 (K,), in the rulebook's array library."""
        return backend.array_namespace(self.offset_ptr).diff(self.offset_ptr)

    def pairs(self, k):
        """``(in_rows, out_rows)`` of kernel offset ``k``."""
        start, stop = int(self.offset_ptr[k]), int(self.offset_ptr[k + 1])
        return self.in_idx[start:stop], self.out_idx[start:stop]

    def transpose(self):
        """The adjoint rulebook: inputs and outputs swapped (same offsets); cached."""
        return self.derived("transpose", self._make_transpose)

    def _make_transpose(self):
        transposed = Rulebook(self.out_idx, self.in_idx, self.offset_ptr, self.n_out, self.n_in,
                        self.filter_size, stride=self.stride, dilation=self.dilation,
                        kind=self.kind, identity_offset=self.identity_offset,
                        transposed=not self.transposed)
        transposed._derived["transpose"] = self
        return transposed

    def check_pairs(self):
        """The invariants the convolution kernels rely on, checked in a few passes over the
        pairs (host reads of a few numbers on a GPU): rows in range, ``offset_ptr`` a
        partition of the pairs, an identity offset that really pairs every row with itself
        in row order. Raises ValueError naming what is wrong; returns ``offset_ptr`` as a
        NumPy int64 array. Each backend calls it once per rulebook (and its transpose)."""
        in_idx, out_idx = self.in_idx, self.out_idx
        xp = backend.array_namespace(in_idx)
        ptr = backend.to_numpy(self.offset_ptr).astype(np.int64)
        n_pairs, n_offsets = len(in_idx), len(ptr) - 1
        if len(out_idx) != n_pairs:
            raise ValueError(f"rulebook in_idx and out_idx differ in length ({n_pairs} and "
                             f"{len(out_idx)})")
        if n_offsets < 0 or ptr[0] != 0 or ptr[-1] != n_pairs or np.any(np.diff(ptr) < 0):
            raise ValueError(f"rulebook offset_ptr must rise from 0 to the {n_pairs} pairs; "
                             f"got {ptr.tolist()[:8]}...")
        if n_pairs:
            bounds = backend.to_numpy(xp.stack([in_idx.min(), in_idx.max(), out_idx.min(),
                                                out_idx.max()]).astype(np.int64))
            for name, (low, high), n in (("in_idx", bounds[:2], self.n_in),
                                         ("out_idx", bounds[2:], self.n_out)):
                if low < 0 or high >= n:
                    raise ValueError(f"rulebook {name} must hold rows in [0, {n}); got values "
                                     f"in [{int(low)}, {int(high)}]")
        k = self.identity_offset
        if k >= 0:
            if k >= n_offsets or self.n_in != self.n_out:
                raise ValueError(f"rulebook identity_offset {k} needs n_in == n_out and an "
                                 f"offset below {n_offsets}; got n_in={self.n_in}, "
                                 f"n_out={self.n_out}")
            a, b = int(ptr[k]), int(ptr[k + 1])
            rows = xp.arange(self.n_out, dtype=in_idx.dtype)
            if b - a != self.n_out or not bool(backend.to_numpy(
                    ((in_idx[a:b] == rows) & (out_idx[a:b] == rows)).all())):
                raise ValueError(f"rulebook identity_offset {k} must pair every row with "
                                 "itself in row order; its pairs differ (build the rulebook "
                                 "with identity_offset=-1)")
        return ptr

    def neighbor_map(self):
        """Output-stationary view: int32 (n_out, K), the input row of each offset or -1."""
        xp = backend.array_namespace(self.in_idx)
        table = xp.full((self.n_out, self.n_offsets), -1, dtype=xp.int32)
        # the offset of each pair, without a host read of the pointers
        offset_of_pair = xp.searchsorted(self.offset_ptr, xp.arange(self.n_pairs),
                                         side="right") - 1
        table[self.out_idx, offset_of_pair] = self.in_idx
        return table

    def save(self, path):
        """Write the rulebook to an ``.npz`` file readable with plain ``numpy.load``."""
        arrays = {name: backend.to_numpy(getattr(self, name)) for name in _FIELDS}
        meta = {name: np.asarray(getattr(self, name)) for name in _META}
        if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
            with open(path, "wb") as handle:  # exactly this path: np.savez would add .npz
                np.savez(handle, **arrays, **meta)
        else:
            np.savez(path, **arrays, **meta)

    @classmethod
    def load(cls, path):
        """Read a rulebook written by :meth:`save`."""
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not a sparsegrid rulebook file: it holds a single "
                             "array, not the .npz written by Rulebook.save")
        with data:
            missing = [n for n in _FIELDS + _META if n not in data]
            if missing:
                raise ValueError(f"{path} is not a sparsegrid rulebook file: missing {missing}")
            rulebook = cls(data["in_idx"].astype(np.int32), data["out_idx"].astype(np.int32),
                           data["offset_ptr"].astype(np.int64), int(data["n_in"]),
                           int(data["n_out"]), tuple(data["filter_size"]),
                           stride=tuple(data["stride"]), dilation=tuple(data["dilation"]),
                           kind=str(data["kind"]),
                           identity_offset=int(data["identity_offset"]),
                           transposed=bool(data["transposed"]))
        rulebook._check(path)
        return rulebook

    def _check(self, source):
        """Structural checks of a rulebook from outside (rows in range, pointers sound)."""
        ptr = self.offset_ptr
        problems = []
        if len(ptr) != int(np.prod(self.filter_size)) + 1:
            problems.append(f"offset_ptr has {len(ptr)} entries for filter_size "
                            f"{self.filter_size}")
        elif ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != len(self.in_idx):
            problems.append("offset_ptr is not a non-decreasing partition of the pairs")
        if len(self.in_idx) != len(self.out_idx):
            problems.append("in_idx and out_idx differ in length")
        for name, rows, n in (("in_idx", self.in_idx, self.n_in),
                              ("out_idx", self.out_idx, self.n_out)):
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                problems.append(f"{name} has rows outside [0, {n})")
        if problems:
            raise ValueError(f"{source} is not a valid rulebook: " + "; ".join(problems))

    def __repr__(self):
        t = ", transposed" if self.transposed else ""
        return (f"Rulebook({self.kind}{t}, filter_size={self.filter_size}, stride={self.stride}, "
                f"dilation={self.dilation}, n_in={self.n_in}, n_out={self.n_out}, "
                f"n_pairs={self.n_pairs})")
