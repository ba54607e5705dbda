"""workbench.metrics: downsample() and SeriesStore.

* downsample keeps a series' extremes (a single spike survives) and its first point, returns real input
  points in order, at most n_out of them, for any x dtype; NaN and inf stay visible where they start.
* SeriesStore appends rows (missing columns as NaN, bad rows refused leaving it clean), reads copies
  (frame, column, last, series), keeps a block summary that gives the same series however the rows came,
  bounds its memory by compaction (newest rows at full resolution, older ones at a uniform stride), and
  never shows a reader a half-written row while another thread writes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from workbench.metrics import SUMMARY_BLOCKS, SeriesStore, downsample

COLS = ("step", "loss", "lr", "acc")


def random_walk(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).cumsum()


# ---------------------------------------------------------------------------------------------- downsample
def test_downsample_short_input_is_returned_unchanged() -> None:
    x = np.arange(10)
    y = np.linspace(0, 1, 10)
    xo, yo = downsample(x, y, n_out=10)
    assert xo is x and yo is y


@pytest.mark.parametrize("xdtype", [np.int64, np.int32, np.float64, np.float32, np.uint8])
def test_downsample_keeps_extremes_and_bound(xdtype) -> None:
    n = 200 if xdtype is np.uint8 else 100_000
    x = np.arange(n).astype(xdtype)
    y = random_walk(n)
    y[n // 3] = y.max() + 50.0  # a single spike must survive
    y[2 * n // 3] = y.min() - 50.0
    xo, yo = downsample(x, y, n_out=100)
    assert len(xo) == len(yo) <= 100
    assert yo.max() == y.max() and yo.min() == y.min()
    assert np.all(np.diff(xo.astype(np.float64)) > 0)  # sorted, unique
    assert xo[0] == x[0]
    # every output point is a real input point
    idx = np.searchsorted(x.astype(np.float64), xo.astype(np.float64))
    np.testing.assert_array_equal(y[idx], yo)


def test_downsample_nonfinite_does_not_crash_and_stays_visible() -> None:
    n = 50_000
    x = np.arange(n)
    y = random_walk(n)
    y[30_000:] = np.nan  # diverged: NaN from here on
    y[10_000] = np.inf
    y[12_000:12_010] = -np.inf
    xo, yo = downsample(x, y, n_out=500)
    assert len(xo) <= 500
    assert np.all(np.diff(xo) > 0)
    assert 30_000 in xo and np.isnan(yo[xo == 30_000][0])  # first NaN of the divergence is kept
    assert 10_000 in xo and yo[xo == 10_000][0] == np.inf
    assert 12_000 in xo and yo[xo == 12_000][0] == -np.inf
    finite = np.isfinite(y)
    assert np.nanmax(yo[np.isfinite(yo)]) == y[finite].max()
    assert np.nanmin(yo[np.isfinite(yo)]) == y[finite].min()


def test_downsample_all_nan_and_many_nan_stretches() -> None:
    x = np.arange(10_000, dtype=np.float64)
    y = np.full(10_000, np.nan)
    xo, yo = downsample(x, y, n_out=100)
    assert 1 <= len(xo) <= 100 and np.isnan(yo).all()
    y = random_walk(10_000)
    y[::7] = np.nan  # > 1000 separate NaN stretches
    xo, yo = downsample(x, y, n_out=100)
    assert len(xo) <= 100
    assert 0 < np.isnan(yo).sum() <= 25


def test_downsample_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_out"):
        downsample(np.arange(10), np.arange(10.0), n_out=2)
    with pytest.raises(ValueError, match="same length"):
        downsample(np.arange(10), np.arange(9.0))


# ---------------------------------------------------------------------------------------------- SeriesStore basics
def test_append_fills_missing_columns_with_nan_and_reads_are_copies() -> None:
    s = SeriesStore(COLS)
    assert len(s) == 0 and s.last() is None and s.stride == 1
    assert list(s.frame().columns) == list(COLS) and len(s.frame()) == 0
    s.append({"step": 0, "loss": 2.5, "lr": 0.1, "acc": 0.1})
    s.append({"step": 1, "loss": 2.0})  # missing columns -> NaN
    s.append({"step": 2, "loss": np.float32(1.5), "acc": None})
    assert len(s) == 3
    df = s.frame()
    assert list(df.columns) == list(COLS)
    np.testing.assert_array_equal(df["step"], [0, 1, 2])
    assert np.isnan(df["lr"].iloc[1]) and np.isnan(df["acc"].iloc[2])
    assert s.last() == pytest.approx({"step": 2.0, "loss": 1.5, "lr": np.nan, "acc": np.nan}, nan_ok=True)
    col = s.column("loss")
    col[:] = 99  # a copy
    assert s.column("loss")[0] == 2.5


def test_unknown_column_and_bad_value_leave_store_clean() -> None:
    s = SeriesStore(COLS)
    with pytest.raises(ValueError, match="'bogus'.*allowed"):
        s.append({"step": 0, "loss": 1.0, "bogus": 3.0})
    with pytest.raises(ValueError, match="'lr'"):
        s.append({"step": 0, "lr": "fast"})
    assert len(s) == 0
    s.append({"step": 5})
    row = s.last()
    assert row is not None and row["step"] == 5 and np.isnan(row["loss"]) and np.isnan(row["lr"])
    with pytest.raises(ValueError, match="allowed"):
        s.column("nope")
    with pytest.raises(ValueError, match="allowed"):
        s.extend({"nope": [1, 2]})
    with pytest.raises(ValueError, match="same length"):
        s.extend({"step": [1, 2, 3], "loss": [1.0, 2.0]})
    with pytest.raises(ValueError):
        SeriesStore(COLS, dtype=np.int64)
    with pytest.raises(ValueError):
        SeriesStore(("a", "a"))


def test_extend_appends_columns_and_series_keeps_the_extremes() -> None:
    s = SeriesStore(COLS)
    n = 50_000
    steps = np.arange(n)
    loss = random_walk(n, seed=1)
    s.extend({"step": steps, "loss": loss})
    s.extend({"step": [n, n + 1], "acc": [0.5, 0.6]})
    assert len(s) == n + 2
    df = s.frame()
    np.testing.assert_array_equal(df["step"].to_numpy()[:n], steps)
    assert np.isnan(df["loss"].iloc[-1]) and df["acc"].iloc[-1] == 0.6
    x, y = s.series("loss", n_out=300)
    assert len(x) <= 300
    assert np.nanmax(y) == loss.max() and np.nanmin(y) == loss.min()
    xr, yr = s.series("loss", x=None, n_out=300)  # x = row number
    assert len(xr) <= 300 and xr[0] == 0


def test_series_from_the_block_summary_is_incremental_and_keeps_what_matters() -> None:
    """On long series, series() reads per-block extremes kept up to date with each append: the same
    answer whether the rows came in one go or in pieces with refreshes between."""
    n_out, n = 500, 300_000
    assert 2 * (n // SUMMARY_BLOCKS[2]) >= 3 * n_out  # 256-row blocks serve it (64-row ones on the way)
    rng = np.random.default_rng(3)
    loss = random_walk(n, seed=3)
    loss[rng.integers(0, n, 5)] += 500.0  # spikes
    loss[200_001:200_050] = np.nan  # a stretch the run went NaN
    loss[250_000] = np.inf
    whole = SeriesStore(("step", "loss"))
    whole.extend({"step": np.arange(n), "loss": loss})
    pieces = SeriesStore(("step", "loss"))
    for lo in range(0, n, 7_777):  # refreshes while rows arrive, as a live view does
        pieces.extend({"step": np.arange(lo, min(n, lo + 7_777)), "loss": loss[lo:lo + 7_777]})
        pieces.series("loss", n_out=n_out)
    x, y = pieces.series("loss", n_out=n_out)
    xw, yw = whole.series("loss", n_out=n_out)
    np.testing.assert_array_equal(x, xw)
    np.testing.assert_array_equal(y, yw)
    assert len(x) <= n_out and np.all(np.diff(x) > 0)
    finite, shown = loss[np.isfinite(loss)], y[np.isfinite(y)]
    assert shown.max() == finite.max() and shown.min() == finite.min()
    assert (np.isclose(y, loss[x.astype(int)], equal_nan=True)).all()  # real rows, not made-up values
    assert 200_001 in x and 250_000 in x  # where the values stopped being finite is shown
    assert 2 * n_out > len(x) > 0.9 * n_out  # the full resolution of the chart, not a coarser one
    # x=None (row numbers) and a compaction (rows move: the summary starts again) give sane answers too
    xr, yr = whole.series("loss", x=None, n_out=n_out)
    assert len(xr) <= n_out and yr[np.isfinite(yr)].max() == finite.max() and xr[0] == 0 and xr[-1] == n - 1
    small = SeriesStore(("step", "loss"), capacity=SUMMARY_BLOCKS[-1] * 40)
    small.extend({"step": np.arange(n), "loss": loss})
    xs, ys = small.series("loss", n_out=10)
    assert len(xs) <= 10 and np.all(np.diff(xs) > 0) and np.array_equal(ys, loss[xs.astype(int)], equal_nan=True)


# ---------------------------------------------------------------------------------------------- bounded memory
def test_compaction_bounds_memory() -> None:
    cap = 64
    s = SeriesStore(("step", "v"), capacity=cap)
    for i in range(1000):
        s.append({"step": i, "v": i * 0.5})
        assert len(s) <= cap
        assert s.allocated_rows <= cap  # never allocates more than capacity rows
    steps = s.column("step")
    assert steps[0] == 0 and steps[-1] == 999
    assert np.all(np.diff(steps) > 0)
    assert s.stride > 1
    # the oldest part is thinned by the stride; the newest rows are at full resolution
    assert steps[1] - steps[0] == s.stride
    m = s.thinned_rows  # the old part holds appended rows 0, S, 2S, ... (uniform resolution)
    np.testing.assert_array_equal(steps[:m], np.arange(m) * s.stride)
    assert np.all(np.diff(steps[-cap // 2 :]) == 1)  # the newest capacity//2 rows are at full resolution
    np.testing.assert_array_equal(s.column("v"), steps * 0.5)
    assert s.appended == 1000

    # a batch larger than the capacity goes through compaction too
    s2 = SeriesStore(("step",), capacity=cap)
    s2.extend({"step": np.arange(10_000)})
    st = s2.column("step")
    assert len(st) <= cap and st[0] == 0 and st[-1] == 9_999 and np.all(np.diff(st) > 0)
    s2.clear()
    assert len(s2) == 0 and s2.stride == 1 and s2.last() is None


# ---------------------------------------------------------------------------------------------- threads
def test_concurrent_writer_and_reader_never_see_torn_rows() -> None:
    s = SeriesStore(("step", "a", "b", "c"), capacity=4096)
    stop = threading.Event()
    errors: list[str] = []
    n_rows = 60_000

    def writer() -> None:
        for i in range(n_rows):
            if i % 3 == 0:
                s.extend({"step": [i], "a": [i * 1.0], "b": [i * 2.0], "c": [-i * 1.0]})
            else:
                s.append({"step": i, "a": i * 1.0, "b": i * 2.0, "c": -i * 1.0})
        stop.set()

    def reader() -> None:
        checks = 0
        while not stop.is_set() or checks < 5:
            df = s.frame()
            a = df["a"].to_numpy()
            if df.isna().any().any():
                errors.append("NaN in a written row")
            if not (np.array_equal(df["b"].to_numpy(), 2 * a) and np.array_equal(df["c"].to_numpy(), -a)):
                errors.append("torn row in frame()")
            if len(a) > 1 and not np.all(np.diff(df["step"].to_numpy()) > 0):
                errors.append("steps not increasing")
            last = s.last()
            if last is not None and not (last["b"] == 2 * last["a"] and last["c"] == -last["a"]):
                errors.append(f"torn last row {last}")
            for n_out in (100, 10):  # 10: the block summary from 960 rows on, through compactions
                x, y = s.series("b", n_out=n_out)
                if len(x) and not (np.array_equal(y, 2 * x) and len(x) <= n_out and np.all(np.diff(x) > 0)):
                    errors.append(f"torn series (n_out={n_out})")
            checks += 1
            if errors:
                return

    tw = threading.Thread(target=writer)
    tr = threading.Thread(target=reader)
    tr.start()
    tw.start()
    tw.join(timeout=60)
    tr.join(timeout=60)
    assert not errors, errors[:3]
    assert s.last() == {"step": n_rows - 1, "a": n_rows - 1, "b": 2 * (n_rows - 1), "c": -(n_rows - 1)}


# ------------------------------------------------------------------------------ a million rows (speed printed, not asserted)
def test_a_million_rows_are_stored_and_downsampled_to_n_out() -> None:
    cols = [f"c{i}" for i in range(7)]
    s = SeriesStore(["step", *cols])
    rng = np.random.default_rng(0)
    chunk = {c: rng.standard_normal(1000).cumsum() for c in cols}
    t0 = time.perf_counter()
    for k in range(1000):
        s.extend({"step": np.arange(k * 1000, (k + 1) * 1000), **chunk})
    t_extend = time.perf_counter() - t0
    assert len(s) == 1_000_000

    t0 = time.perf_counter()
    x, y = s.series("c0", n_out=2000)
    t_series = time.perf_counter() - t0
    assert len(x) <= 2000

    s2 = SeriesStore(["step", *cols])
    row = {c: 0.5 for c in cols}
    t0 = time.perf_counter()
    for i in range(50_000):
        row["step"] = i
        s2.append(row)
    t_append = (time.perf_counter() - t0) / 50_000

    t0 = time.perf_counter()
    s.frame()
    t_frame = time.perf_counter() - t0
    print(
        f"\n1e6 x 8 extend (chunks of 1000): {t_extend:.3f} s; series() on 1e6 rows: {t_series * 1e3:.1f} ms; "
        f"append: {t_append * 1e6:.2f} us/row; frame() on 1e6 rows: {t_frame * 1e3:.1f} ms"
    )


def test_append_values_matches_append_and_rejects_bad_rows() -> None:
    a, b = SeriesStore(("step", "loss", "lr"), capacity=8), SeriesStore(("step", "loss", "lr"), capacity=8)
    for i in range(20):  # past capacity: both compact the same way
        a.append({"step": i, "loss": 1.0 / (i + 1), "lr": 0.1})
        b.append_values((i, 1.0 / (i + 1), 0.1))
    pd.testing.assert_frame_equal(a.frame(), b.frame())
    assert a.appended == b.appended == 20
    with pytest.raises(ValueError, match="one per column"):
        b.append_values((1, 2.0))
    with pytest.raises(ValueError, match="must be a number"):
        b.append_values((21, "x", 0.1))
    b.append_values((20, None, 0.1))
    assert np.isnan(b.last()["loss"]) and b.appended == 21
    a.append({"step": 20, "lr": 0.1})
    pd.testing.assert_frame_equal(a.frame(), b.frame())  # nothing appended by the failed calls
