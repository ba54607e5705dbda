"""In-memory metric store for a live training run.

The trainer's thread appends one row per step (or per evaluation) to a :class:`SeriesStore`; the
dashboard / notebook thread takes snapshots (:meth:`SeriesStore.frame`) or downsampled series
(:meth:`SeriesStore.series`) for plotting. Memory is bounded: when the store is full, its older half is
thinned out (every second row kept). The full-resolution history is not lost: the trainer also writes
every row to the run's SQLite file (see :mod:`workbench.rundir`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tsdownsample import MinMaxLTTBDownsampler

__all__ = ["downsample", "SeriesStore", "MAX_NONFINITE_KEPT", "SUMMARY_BLOCKS"]

#: How many stretches of non-finite y values :func:`downsample` keeps a marker point for.
MAX_NONFINITE_KEPT = 8

# x dtypes the tsdownsample kernels accept as they are; anything else numeric is cast to float64.
_X_DTYPES = {
    np.dtype(t)
    for t in ("float32", "float64", "uint16", "uint32", "uint64", "int16", "int32", "int64")
}
_Y_DTYPES = _X_DTYPES | {np.dtype(t) for t in ("float16", "int8", "uint8", "bool")}

_DOWNSAMPLER = MinMaxLTTBDownsampler()


def _prepare(a: np.ndarray, allowed: set[np.dtype], what: str) -> np.ndarray:
    """Return ``a`` as a contiguous 1-D array with a dtype tsdownsample accepts."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got an array of shape {a.shape}")
    if a.dtype not in allowed:
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(
                f"{what} must be numeric, got dtype {a.dtype!s}; allowed: ints, unsigned ints, floats, bool"
            )
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _nonfinite_markers(finite: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first point of each stretch of non-finite values, earliest first, at most ``limit``."""
    if limit <= 0:
        return np.empty(0, dtype=np.intp)
    bad = ~finite
    # A stretch starts where a value is bad and the previous one is good (or it is the first value).
    starts = np.flatnonzero(bad & np.concatenate(([True], finite[:-1])))
    return starts[:limit]


def downsample(x: np.ndarray, y: np.ndarray, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a series to at most ``n_out`` points for plotting, keeping its shape and its extremes.

    Why: a browser chart of a million points is slow and shows nothing more than ~2000 well-chosen ones.

    * ``len(x) <= n_out``: the inputs are returned unchanged (same objects).
    * otherwise the points are chosen by tsdownsample's MinMaxLTTB (min/max preselection + LTTB), and the
      global minimum and maximum of the finite y values are always added, so a spike is never lost.
    * non-finite y (NaN/inf, e.g. a diverged run) never crash. Choice made here: the finite points are
      downsampled as above, and for each *stretch* of consecutive non-finite values the first point of the
      stretch is kept (for the first :data:`MAX_NONFINITE_KEPT` stretches, and at most ``n_out // 4``),
      so the chart shows where the values went NaN/inf. The result is sorted by position.

    ``x`` must be increasing (training steps; int or float). Returns ``(x_out, y_out)`` as new arrays.
    """
    n_out = int(n_out)
    if n_out < 3:
        raise ValueError(f"n_out must be an integer >= 3, got {n_out!r}")
    x_arr = np.asarray(x)
    y_arr = np.asarray(y)
    if x_arr.shape != y_arr.shape or x_arr.ndim != 1:
        raise ValueError(
            f"x and y must be 1-D arrays of the same length, got shapes {x_arr.shape} and {y_arr.shape}"
        )
    n = len(x_arr)
    if n <= n_out:
        return x, y
    xs = _prepare(x_arr, _X_DTYPES, "x")
    ys = _prepare(y_arr, _Y_DTYPES, "y")

    if np.issubdtype(ys.dtype, np.floating):
        finite = np.isfinite(ys)
    else:
        finite = np.ones(n, dtype=bool)
    if np.issubdtype(xs.dtype, np.floating):
        x_finite = np.isfinite(xs)
        if not x_finite.all():  # points without a position cannot be drawn: drop them
            finite &= x_finite
            markers_ok = x_finite
        else:
            markers_ok = None
    else:
        markers_ok = None

    if finite.all():
        idx = _select(xs, ys, n_out)
        return x_arr[idx], y_arr[idx]

    markers = _nonfinite_markers(finite, min(MAX_NONFINITE_KEPT, n_out // 4))
    if markers_ok is not None:
        markers = markers[markers_ok[markers]]
    good = np.flatnonzero(finite)
    budget = n_out - len(markers)
    if len(good) <= budget:
        chosen = good
    else:
        sub = _select(np.ascontiguousarray(xs[good]), np.ascontiguousarray(ys[good]), budget)
        chosen = good[sub]
    idx = np.union1d(chosen, markers)  # sorted, unique
    return x_arr[idx], y_arr[idx]


def _select(xs: np.ndarray, ys: np.ndarray, n_out: int) -> np.ndarray:
    """Indices (sorted) of at most ``n_out`` points of an all-finite series: MinMaxLTTB + global extremes."""
    n = len(xs)
    if n <= n_out:
        return np.arange(n)
    extremes = np.array([np.argmin(ys), np.argmax(ys)], dtype=np.intp)
    m = n_out - 2
    if m >= 3:
        base = _DOWNSAMPLER.downsample(xs, ys, n_out=m).astype(np.intp, copy=False)
    else:  # tiny budget: keep the ends
        base = np.array([0, n - 1], dtype=np.intp)[:m]
    return np.union1d(base, extremes)  # sorted, unique, at most n_out


#: Block sizes (rows) of a :class:`SeriesStore` series summary (see :meth:`SeriesStore.series`). A
#: refresh uses the coarsest one that still offers ``3 * n_out`` candidate points (two per block, as
#: many as MinMaxLTTB's own pre-selection would pick); below ``3 * n_out * 64 / 2`` rows every row is
#: read (cheap at that size, and exact).
SUMMARY_BLOCKS = (4096, 1024, 256, 64)


def _summary_block(n: int, n_out: int) -> int | None:
    for block in SUMMARY_BLOCKS:
        if 2 * (n // block) >= 3 * n_out:
            return block
    return None


class _BlockSummary:
    """Row positions worth plotting from the first ``rows`` stored rows (a multiple of ``block``),
    valid while the store's ``layout`` is unchanged. Replaced, never changed in place."""

    __slots__ = ("layout", "block", "rows", "cand")

    def __init__(self, layout: int, block: int, rows: int = 0, cand: np.ndarray | None = None) -> None:
        self.layout, self.block, self.rows = layout, block, rows
        self.cand = np.empty(0, dtype=np.intp) if cand is None else cand


def _block_candidates(y: np.ndarray, offset: int, block: int) -> np.ndarray:
    """Sorted row positions (``offset`` + index) of each ``block``-row block's smallest and largest
    finite value and of its first non-finite value, for ``y`` holding whole blocks."""
    blocks = y.reshape(-1, block)
    finite = np.isfinite(blocks)
    base = offset + np.arange(len(blocks)) * block
    has = finite.any(axis=1)
    lo = np.where(finite, blocks, np.inf).argmin(axis=1)
    hi = np.where(finite, blocks, -np.inf).argmax(axis=1)
    bad = ~finite
    has_bad = bad.any(axis=1)
    first_bad = bad.argmax(axis=1)
    cand = np.concatenate((base[has] + lo[has], base[has] + hi[has], base[has_bad] + first_bad[has_bad],
                           base[:1] if offset == 0 else base[:0]))  # the first row: charts start there
    return np.unique(cand).astype(np.intp, copy=False)


class SeriesStore:
    """Columnar, thread-safe, bounded-memory store of numeric rows (one row per training step, or per eval).

    Why: the trainer thread appends thousands of rows per second while a reader thread plots them; this
    keeps appends cheap (preallocated numpy columns growing by doubling, one lock) and memory bounded.

    * Missing columns in a row are stored as NaN; an unknown column raises ``ValueError``.
    * Readers get copies (:meth:`column`, :meth:`frame`, :meth:`last`, :meth:`series`) taken under the
      lock, so they never see a half-written row.
    * Bounded memory: at most ``capacity`` rows are ever allocated. When full, the older half of the rows
      is compacted by keeping every second row (rows 0, 2, 4, ...). Later compactions keep the newest
      ``capacity // 2`` rows at full resolution and everything older at one uniform stride S (appended
      rows 0, S, 2S, ...; S doubles when that part would exceed ``capacity // 4`` rows), so the whole
      history keeps its shape at lower resolution. :attr:`stride` is S. Full-resolution data stays in the
      run's SQLite file (``run.db``); plot old details from there.
    """

    _INITIAL_ROWS = 1024

    def __init__(self, columns: Sequence[str], capacity: int = 2_000_000, dtype: np.dtype | type = np.float64):
        cols = tuple(columns)
        if not cols:
            raise ValueError("columns must name at least one column, got an empty sequence")
        for c in cols:
            if not isinstance(c, str) or not c:
                raise ValueError(f"column names must be non-empty strings, got {c!r}")
        if len(set(cols)) != len(cols):
            dups = sorted({c for c in cols if cols.count(c) > 1})
            raise ValueError(f"column names must be unique, got duplicates {dups!r} in {cols!r}")
        capacity = int(capacity)
        if capacity < 4:
            raise ValueError(f"capacity must be an integer >= 4, got {capacity!r}")
        dt = np.dtype(dtype)
        if not np.issubdtype(dt, np.floating):
            raise ValueError(f"dtype must be a floating dtype (float32, float64, ...) to hold NaN, got {dt!s}")
        self.columns: tuple[str, ...] = cols
        self.capacity: int = capacity
        self.dtype: np.dtype = dt
        self._index: dict[str, int] = {c: i for i, c in enumerate(cols)}
        self._lock = threading.Lock()
        self._data = self._alloc(min(capacity, self._INITIAL_ROWS))
        self._n = 0
        self._stride = 1
        self._old_rows = 0  # rows of the compacted (strided) old part, at the start of the arrays
        self._appended = 0
        self._layout = 0  # bumped whenever stored rows move or go (compaction, clear): summaries restart
        self._summaries: dict[tuple[int, int], _BlockSummary] = {}  # (y column, block) -> its blocks' extremes
        self._summary_lock = threading.Lock()

    # ------------------------------------------------------------------ internals (lock held)
    def _alloc(self, rows: int) -> np.ndarray:
        """A (n_columns, rows) array filled with NaN: unwritten cells read as 'missing'."""
        return np.full((len(self.columns), rows), np.nan, dtype=self.dtype)

    def _make_room(self) -> None:
        """Ensure at least one free row: grow by doubling (up to capacity), else compact."""
        alloc = self._data.shape[1]
        if self._n < alloc:
            return
        if alloc < self.capacity:
            new = self._alloc(min(alloc * 2, self.capacity))
            new[:, : self._n] = self._data[:, : self._n]
            self._data = new
            return
        self._compact()

    def _compact(self) -> None:
        """Thin the rows older than the newest ``capacity // 2``: keep every S-th appended row there.

        Invariant: stored rows = [old part: appended rows 0, S, 2S, ... (S = stride)] + [recent part: every
        appended row]. On compaction the recent part is cut to the newest ``capacity // 2`` rows; the rows cut
        off join the old part at stride S, and S doubles as often as needed (each doubling keeps every second
        row of the old part) until the old part holds at most ``capacity // 4`` rows. So memory stays <= capacity rows, the history keeps a uniform
        resolution, and the first compaction is exactly "keep every second row of the older half".
        Rows are moved forward in place in small chunks (no full-size temporary copy).
        """
        n = self._n
        cap = self.capacity
        keep_recent = cap // 2
        old_max = max(1, cap // 4)
        m = self._old_rows
        s_old = self._stride
        r0 = self._appended - (n - m)  # appended index of the first recent row
        r1 = self._appended - keep_recent  # appended index of the first row that stays recent
        s_new = s_old
        while True:  # smallest stride (S, 2S, 4S, ...) whose old part fits in old_max rows
            old_kept = -(-m // (s_new // s_old))  # ceil
            first = (-r0) % s_new  # offset of the first multiple of s_new at or after r0
            inc_kept = 0 if r0 + first >= r1 else (r1 - 1 - (r0 + first)) // s_new + 1
            if old_kept + inc_kept <= old_max:
                break
            s_new *= 2
        d = self._data
        dst = 0
        dst = self._move(d, dst, 0, s_new // s_old, old_kept)
        dst = self._move(d, dst, m + first, s_new, inc_kept)
        dst = self._move(d, dst, n - keep_recent, 1, keep_recent)
        d[:, dst:n] = np.nan
        self._n = dst
        self._old_rows = old_kept + inc_kept
        self._stride = s_new
        self._layout += 1

    @staticmethod
    def _move(d: np.ndarray, dst: int, src: int, step: int, count: int, chunk: int = 65_536) -> int:
        """Copy ``count`` rows ``src, src+step, ...`` to ``dst, dst+1, ...`` (dst <= src); return the new dst."""
        for k0 in range(0, count, chunk):
            k1 = min(count, k0 + chunk)
            d[:, dst + k0 : dst + k1] = d[:, src + k0 * step : src + (k1 - 1) * step + 1 : step]
        return dst + count

    def _col(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"unknown column {name!r}; allowed: {list(self.columns)!r}") from None

    # ------------------------------------------------------------------ writing
    def append(self, row: Mapping[str, float]) -> None:
        """Append one row; columns missing from ``row`` (or given as None) become NaN.

        Unknown column or a value that is not a number -> ``ValueError`` (nothing is appended).
        """
        index = self._index
        with self._lock:
            self._make_room()
            d = self._data
            n = self._n
            try:
                for k, v in row.items():
                    d[index[k], n] = v
            except Exception:
                # slow path: None means missing (NaN); anything else must convert to float
                d[:, n] = np.nan
                for k, v in row.items():
                    j = index.get(k)
                    if j is None:
                        bad = [kk for kk in row if kk not in index]
                        d[:, n] = np.nan  # leave the free slot clean for the next row
                        raise ValueError(
                            f"unknown column(s) {bad!r} in row; allowed: {list(self.columns)!r}"
                        ) from None
                    try:
                        d[j, n] = np.nan if v is None else float(v)
                    except (TypeError, ValueError) as exc:
                        d[:, n] = np.nan
                        raise ValueError(
                            f"column {k!r} must be a number or None, got {v!r:.200}"
                        ) from exc
            self._n = n + 1
            self._appended += 1

    def append_values(self, values: Sequence[float]) -> None:
        """Append one row given as numbers in :attr:`columns` order (the trainer's per-step fast path:
        one array assignment instead of a dict walk); None means missing (NaN). A wrong count or a value
        that is not a number -> ``ValueError`` (nothing is appended)."""
        if len(values) != len(self.columns):
            raise ValueError(f"append_values: got {len(values)} values; allowed: one per column {list(self.columns)!r}")
        try:
            row = np.asarray(values, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"append_values: every value must be a number or None, got {values!r:.200}") from exc
        with self._lock:
            self._make_room()
            self._data[:, self._n] = row
            self._n += 1
            self._appended += 1

    def extend(self, rows: Mapping[str, Sequence[float] | np.ndarray]) -> None:
        """Append many rows at once, given column-wise (all sequences the same length); missing columns -> NaN."""
        if not rows:
            return
        arrays: list[tuple[int, np.ndarray]] = []
        length: int | None = None
        for k, v in rows.items():
            j = self._col(k)
            try:
                a = np.asarray(v, dtype=self.dtype)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"column {k!r} must hold numbers, got {v!r:.200}") from exc
            if a.ndim != 1:
                raise ValueError(f"column {k!r} must be 1-D, got shape {a.shape}")
            if length is None:
                length = len(a)
            elif len(a) != length:
                lens = {kk: len(np.atleast_1d(vv)) for kk, vv in rows.items()}
                raise ValueError(f"all columns must have the same length, got lengths {lens!r}")
            arrays.append((j, a))
        assert length is not None
        with self._lock:
            pos = 0
            while pos < length:
                self._make_room()
                # grow further if the chunk is large and we have not hit capacity yet
                while self._data.shape[1] < self.capacity and self._data.shape[1] - self._n < length - pos:
                    alloc = self._data.shape[1]
                    new = self._alloc(min(alloc * 2, self.capacity))
                    new[:, : self._n] = self._data[:, : self._n]
                    self._data = new
                take = min(length - pos, self._data.shape[1] - self._n)
                n = self._n
                for j, a in arrays:
                    self._data[j, n : n + take] = a[pos : pos + take]
                self._n = n + take
                self._appended += take  # per chunk: _compact() relies on it
                pos += take

    def clear(self) -> None:
        """Drop all rows and release the memory (stride back to 1)."""
        with self._lock:
            self._data = self._alloc(min(self.capacity, self._INITIAL_ROWS))
            self._n = 0
            self._stride = 1
            self._old_rows = 0
            self._appended = 0
            self._layout += 1

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Number of rows currently stored (after compaction, fewer than were appended)."""
        return self._n

    @property
    def stride(self) -> int:
        """How many original rows one stored row of the oldest part stands for (1 until compaction)."""
        return self._stride

    @property
    def appended(self) -> int:
        """Total number of rows ever appended since creation / :meth:`clear` (compaction does not reduce it)."""
        return self._appended

    @property
    def allocated_rows(self) -> int:
        """Rows of memory allocated now (grows by doubling up to ``capacity``, never past it)."""
        return self._data.shape[1]

    @property
    def thinned_rows(self) -> int:
        """How many of the stored rows, at the start, are the thinned old part: appended rows 0, S, 2S, ...
        (S = :attr:`stride`); 0 until the first compaction. The rows after them are stored as appended."""
        return self._old_rows

    def column(self, name: str) -> np.ndarray:
        """A copy of one column's stored values."""
        j = self._col(name)
        with self._lock:
            return self._data[j, : self._n].copy()

    def tail(self, n: int, names: Sequence[str] | None = None, copy: bool = True) -> dict[str, np.ndarray]:
        """The last ``n`` stored rows of some columns (cheap: O(n), not O(len)).

        ``copy=False`` returns read-only views into the store instead of copies: only for the thread that
        appends, and only until its next append (the trainer's own detectors use it between steps)."""
        cols = list(self.columns if names is None else names)
        idx = [self._col(c) for c in cols]
        with self._lock:
            lo = max(0, self._n - int(n))
            if copy:
                block = self._data[idx, lo: self._n]  # a list index: numpy returns a copy already
                return {c: block[k] for k, c in enumerate(cols)}
            out = {}
            for c, j in zip(cols, idx):
                v = self._data[j, lo: self._n]
                v.flags.writeable = False
                out[c] = v
            return out

    def frame(self) -> pd.DataFrame:
        """A snapshot copy of all rows as a DataFrame, columns in declaration order."""
        with self._lock:
            block = self._data[:, : self._n].copy()
        return pd.DataFrame({c: block[j] for j, c in enumerate(self.columns)}, columns=list(self.columns))

    def last(self) -> dict[str, float] | None:
        """The most recent row as ``{column: float}`` (NaN for missing), or None when empty."""
        with self._lock:
            if self._n == 0:
                return None
            vals = self._data[:, self._n - 1].tolist()
        return dict(zip(self.columns, vals))

    def series(self, y: str, x: str | None = "step", n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` columns downsampled to at most ``n_out`` points for plotting (see :func:`downsample`).

        ``x=None`` uses the stored row number. Rows whose x is NaN are dropped (they have no position).

        A refresh costs about the same at 10^3 rows as at 10^6: the store keeps, per y column, the
        positions of the smallest and largest finite value (and the first non-finite one) of every
        full block of rows (:data:`SUMMARY_BLOCKS`), updated with only the rows appended since the last
        call. On long series :func:`downsample` runs on those candidates plus the rows of the last,
        partial block, instead of on every row. Every block's extremes are in, so the global minimum
        and maximum and every spike survive as before; non-finite values keep a marker at the first
        one of each block they appear in (one per stretch, unless a stretch starts again inside a
        block).
        """
        jy = self._col(y)
        jx = None if x is None else self._col(x)
        for attempt in range(3):  # a compaction between the two locked sections moves rows: try again
            got = self._series_rows(jy, jx, n_out, summary_ok=attempt < 2)
            if got is not None:
                xs, ys = got
                break
        if jx is not None:
            ok = np.isfinite(xs)
            if not ok.all():
                xs, ys = xs[ok], ys[ok]
        return downsample(xs, ys, n_out=n_out)

    def _series_rows(self, jy: int, jx: int | None, n_out: int,
                     summary_ok: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, y) of the rows a refresh looks at: all of them, or the summary's candidates plus the last
        partial block. None when the rows moved (compaction) before the summary could be extended."""
        with self._lock:
            n, layout = self._n, self._layout
            block = _summary_block(n, n_out) if summary_ok else None
            if block is None:
                return (np.arange(n) if jx is None else self._data[jx, :n].copy()), self._data[jy, :n].copy()
            with self._summary_lock:
                summary = self._summaries.get((jy, block))
            if summary is None or summary.layout != layout:
                summary = _BlockSummary(layout, block)
            start, full = summary.rows, n - n % block
            fresh = self._data[jy, start:full].copy()  # rows not summarised yet (all of them the first time)
            tail = min(full, n - 1)  # the rows of the partial block, and always the last row
            cached = summary.cand[:np.searchsorted(summary.cand, tail)]  # sorted; rows before the tail
            rows = np.concatenate((cached, np.arange(tail, n)))
            ys = self._data[jy, rows]
            xs = rows if jx is None else self._data[jx, rows]
        if not len(fresh):
            return xs, ys
        new = _block_candidates(fresh, start, block)  # outside the lock: the trainer may append meanwhile
        new_before_tail = new[new < tail]
        with self._lock:
            if self._layout != layout:
                return None
            new_y = self._data[jy, new_before_tail]
            new_x = new_before_tail if jx is None else self._data[jx, new_before_tail]
        keep = len(cached)
        cand = np.concatenate((summary.cand, new))
        with self._summary_lock:
            current = self._summaries.get((jy, block))
            if current is None or current.layout != layout or current.rows < full:
                self._summaries[jy, block] = _BlockSummary(layout, block, full, cand)
        return np.concatenate((xs[:keep], new_x, xs[keep:])), np.concatenate((ys[:keep], new_y, ys[keep:]))

    def __repr__(self) -> str:
        return f"SeriesStore(columns={self.columns!r}, rows={self._n}, capacity={self.capacity}, stride={self._stride})"
