"""workbench.data: shapes, seeded stratified splits, train-only normalisation,
option validation, CSV loading and the teaching corruptions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.data import DATASETS, DataBundle, describe_datasets, load_dataset

EXPECTED = {
    # name: (task, n_features, n_classes, total rows)
    "digits": ("classification", 64, 10, 1797),
    "breast_cancer": ("classification", 30, 2, 569),
    "wine": ("classification", 13, 3, 178),
    "moons": ("classification", 2, 2, 1000),
    "spirals": ("classification", 2, 3, 1000),
    "regression": ("regression", 8, None, 1000),
}


def _xy(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.tensors  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def bundles() -> dict[str, DataBundle]:
    return {name: load_dataset(name, seed=0) for name in DATASETS}


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_dtypes_and_classes(bundles: dict[str, DataBundle], name: str) -> None:
    task, n_features, n_classes, total = EXPECTED[name]
    b = bundles[name]
    assert (b.task, b.n_features, b.n_classes, b.name) == (task, n_features, n_classes, name)
    assert b.val is not None
    (xt, yt), (xv, yv) = _xy(b.train), _xy(b.val)
    assert len(xt) + len(xv) == total
    assert len(xv) == pytest.approx(0.2 * total, abs=1)
    assert xt.dtype == xv.dtype == torch.float32
    assert xt.shape[1] == xv.shape[1] == n_features
    if task == "classification":
        assert yt.dtype == torch.int64 and yt.shape == (len(xt),)
        assert set(torch.cat([yt, yv]).tolist()) == set(range(n_classes))
        assert b.class_names is not None and len(b.class_names) == n_classes
    else:
        assert yt.dtype == torch.float32 and yt.shape == (len(xt), 1) and yv.shape == (len(xv), 1)
    assert b.feature_names is not None and len(b.feature_names) == n_features
    assert not torch.isnan(xt).any() and not torch.isnan(xv).any()
    assert not torch.isnan(yt.float()).any()


def test_describe_lists_every_dataset() -> None:
    desc = describe_datasets()
    assert set(DATASETS) <= set(desc) and "csv:PATH" in desc
    assert all(isinstance(v, str) and v for v in desc.values())


def test_split_is_seeded_and_stratified() -> None:
    a = load_dataset("wine", seed=3)
    b = load_dataset("wine", seed=3)
    c = load_dataset("wine", seed=4)
    assert torch.equal(_xy(a.val)[0], _xy(b.val)[0]) and torch.equal(_xy(a.train)[1], _xy(b.train)[1])
    assert not torch.equal(_xy(a.val)[0], _xy(c.val)[0])
    # Stratified: class proportions in val match the full data within one row per class.
    d = load_dataset("digits", seed=1, normalize=False)
    yt, yv = _xy(d.train)[1], _xy(d.val)[1]
    full = torch.bincount(torch.cat([yt, yv]), minlength=10).double()
    expected_val = full * len(yv) / full.sum()
    assert (torch.bincount(yv, minlength=10).double() - expected_val).abs().max() <= 1.0


def test_generated_sets_are_seeded() -> None:
    for name in ("moons", "spirals", "regression"):
        a, b, c = (load_dataset(name, seed=s, val_fraction=0) for s in (7, 7, 8))
        assert torch.equal(_xy(a.train)[0], _xy(b.train)[0])
        assert not torch.equal(_xy(a.train)[0], _xy(c.train)[0])


def test_normalisation_uses_train_statistics_only() -> None:
    b = load_dataset("breast_cancer", seed=0)
    xt, xv = _xy(b.train)[0].double(), _xy(b.val)[0].double()
    assert xt.mean(0).abs().max() < 1e-5
    assert (xt.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert xv.mean(0).abs().max() > 1e-3  # val was not standardised on its own statistics
    raw = load_dataset("breast_cancer", seed=0, normalize=False)
    rt, rv = _xy(raw.train)[0].double(), _xy(raw.val)[0].double()
    mean, std = rt.mean(0), rt.std(0, unbiased=False)
    assert torch.allclose(xv, (rv - mean) / std, atol=1e-4)
    assert rt.mean() > 10  # raw values kept
    # Regression target standardised on train too; constant digit pixels don't become NaN.
    r = load_dataset("regression", seed=0)
    yt = _xy(r.train)[1].double()
    assert abs(yt.mean()) < 1e-5 and abs(yt.std(unbiased=False) - 1) < 1e-4
    assert not torch.isnan(_xy(load_dataset("digits").train)[0]).any()


def test_val_fraction_zero_and_validation() -> None:
    b = load_dataset("moons", val_fraction=0)
    assert b.val is None and len(b.train) == 1000
    for bad in (-0.1, 0.95, "0.2", True):
        with pytest.raises(ValueError, match="val_fraction"):
            load_dataset("moons", val_fraction=bad)


def test_unknown_name_and_options_are_explained() -> None:
    with pytest.raises(ValueError, match=r"unknown name 'digit'; allowed: digits, breast_cancer.*csv:PATH"):
        load_dataset("digit")
    with pytest.raises(ValueError, match=r"'noize'.*allowed: .*noise"):
        load_dataset("moons", noize=0.1)
    with pytest.raises(ValueError, match=r"'noise'.*allowed: n_samples"):
        load_dataset("wine", noise=0.1)
    with pytest.raises(ValueError, match="'label_noise'"):
        load_dataset("regression", label_noise=0.1)
    bad = [
        ("moons", {"noise": -1}, "noise"),
        ("moons", {"n_samples": 2.5}, "n_samples"),
        ("spirals", {"n_classes": 1}, "n_classes"),
        ("spirals", {"turns": 0}, "turns"),
        ("regression", {"n_features": 0}, "n_features"),
        ("wine", {"n_samples": 10_000}, "n_samples"),
        ("wine", {"label_noise": 1.5}, "label_noise"),
        ("wine", {"random_labels": "yes"}, "random_labels"),
        ("wine", {"scale": "big"}, "scale"),
        ("wine", {"duplicate_fraction": -0.1}, "duplicate_fraction"),
        ("wine", {"nan_fraction": 2}, "nan_fraction"),
    ]
    for name, opts, field in bad:
        with pytest.raises(ValueError, match=field):
            load_dataset(name, **opts)
    with pytest.raises(ValueError, match="duplicate_fraction.*val_fraction"):
        load_dataset("wine", val_fraction=0, duplicate_fraction=0.5)


def test_generated_sets_take_their_options() -> None:
    s = load_dataset("spirals", n_samples=300, n_classes=5, noise=0.0, val_fraction=0)
    assert s.n_classes == 5 and len(s.train) == 300
    assert torch.bincount(_xy(s.train)[1]).tolist() == [60] * 5
    r = load_dataset("regression", n_samples=200, n_features=3, val_fraction=0)
    assert _xy(r.train)[0].shape == (200, 3)


def test_generated_sets_are_learnable_but_nonlinear() -> None:
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    for name in ("moons", "spirals"):
        b = load_dataset(name, seed=0)
        (xt, yt), (xv, yv) = _xy(b.train), _xy(b.val)
        knn = KNeighborsClassifier(5).fit(xt.numpy(), yt.numpy()).score(xv.numpy(), yv.numpy())
        lin = LogisticRegression().fit(xt.numpy(), yt.numpy()).score(xv.numpy(), yv.numpy())
        assert knn > 0.9 and lin < knn - 0.05, (name, knn, lin)
    r = load_dataset("regression", seed=0)
    (xt, yt), (xv, yv) = _xy(r.train), _xy(r.val)
    r2 = LinearRegression().fit(xt.numpy(), yt.numpy()).score(xv.numpy(), yv.numpy())
    assert 0.3 < r2 < 0.85  # a linear model misses the sin and product terms


def test_n_samples_takes_stratified_subset() -> None:
    b = load_dataset("digits", n_samples=200, seed=0)
    assert len(b.train) + len(b.val) == 200
    counts = torch.bincount(torch.cat([_xy(b.train)[1], _xy(b.val)[1]]), minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22
    tiny = load_dataset("digits", n_samples=12, seed=0)  # too small to stratify: still works
    assert len(tiny.train) + len(tiny.val) == 12


def test_label_noise_and_random_labels() -> None:
    clean = load_dataset("digits", seed=0)
    noisy = load_dataset("digits", seed=0, label_noise=0.5)
    yc, yn = _xy(clean.train)[1], _xy(noisy.train)[1]
    changed = (yc != yn).float().mean().item()
    assert 0.5 * 0.9 - 0.06 < changed < 0.5 * 0.9 + 0.06  # half replaced, 1/10 of those by chance the same
    assert torch.equal(_xy(clean.val)[1], _xy(noisy.val)[1])  # val labels untouched
    assert torch.equal(_xy(clean.train)[0], _xy(noisy.train)[0])  # features untouched
    assert torch.equal(yn, _xy(load_dataset("digits", seed=0, label_noise=0.5).train)[1])

    rand = load_dataset("digits", seed=0, random_labels=True)
    for clean_ds, rand_ds in ((clean.train, rand.train), (clean.val, rand.val)):
        agree = (_xy(clean_ds)[1] == _xy(rand_ds)[1]).float().mean().item()
        assert agree < 0.2  # ~chance level (0.1)
    assert set(_xy(rand.train)[1].tolist()) <= set(range(10))


def test_scale_multiplies_raw_features() -> None:
    base = load_dataset("wine", seed=0, normalize=False)
    big = load_dataset("wine", seed=0, normalize=False, scale=1000.0)
    assert torch.allclose(_xy(big.train)[0], _xy(base.train)[0] * 1000, rtol=1e-5)
    assert torch.allclose(_xy(big.val)[0], _xy(base.val)[0] * 1000, rtol=1e-5)
    # With normalisation the scale cancels out.
    n1, n2 = load_dataset("wine", seed=0), load_dataset("wine", seed=0, scale=1000.0)
    assert torch.allclose(_xy(n1.train)[0], _xy(n2.train)[0], atol=1e-4)


def test_duplicate_fraction_leaks_val_rows_into_train() -> None:
    base = load_dataset("breast_cancer", seed=0, normalize=False)
    leak = load_dataset("breast_cancer", seed=0, normalize=False, duplicate_fraction=0.5)
    xv = _xy(leak.val)[0]
    assert torch.equal(xv, _xy(base.val)[0])
    added = len(leak.train) - len(base.train)
    assert added == round(0.5 * len(xv))
    train_rows = {tuple(r) for r in _xy(leak.train)[0].tolist()}
    base_rows = {tuple(r) for r in _xy(base.train)[0].tolist()}
    val_rows = [tuple(r) for r in xv.tolist()]
    shared = sum(r in train_rows for r in val_rows) - sum(r in base_rows for r in val_rows)
    assert shared == added


def test_nan_fraction_sets_train_values_to_nan() -> None:
    b = load_dataset("wine", seed=0, nan_fraction=0.1)
    xt, xv = _xy(b.train)[0], _xy(b.val)[0]
    assert torch.isnan(xt).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert not torch.isnan(xv).any()
    finite = xt[~torch.isnan(xt)]
    assert finite.numel() > 0 and torch.isfinite(finite).all()


def test_csv_with_categorical_feature_and_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 120
    lines = ["size,colour,weight,fruit"]
    fruits = ["apple", "banana", "cherry"]
    for i in range(n):
        fruit = fruits[i % 3]
        colour = ["red", "yellow", "green"][int(rng.integers(3))]
        lines.append(f"{rng.normal(i % 3, 0.1):.3f},{colour},{rng.normal(5, 1):.3f},{fruit}")
    path = tmp_path / "fruit.csv"
    path.write_text("\n".join(lines) + "\n")

    b = load_dataset(f"csv:{path}", seed=0)
    assert b.task == "classification" and b.n_classes == 3
    assert b.class_names == fruits
    assert b.n_features == 5  # size, weight + 3 one-hot colours
    assert b.feature_names is not None and any(f.startswith("colour_") for f in b.feature_names)
    (xt, yt), (xv, yv) = _xy(b.train), _xy(b.val)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert len(xt) + len(xv) == n and set(yt.tolist()) == {0, 1, 2} and set(yv.tolist()) <= {0, 1, 2}

    # Explicit target (numeric, many values) -> regression; fruit becomes one-hot features.
    r = load_dataset(f"csv:{path}", target="weight", seed=0)
    assert r.task == "regression" and r.n_classes is None and _xy(r.train)[1].shape[1] == 1
    assert r.n_features == 1 + 3 + 3
    with pytest.raises(ValueError, match="'price'.*allowed: size, colour, weight, fruit"):
        load_dataset(f"csv:{path}", target="price")
    with pytest.raises(ValueError, match="task"):
        load_dataset(f"csv:{path}", task="clustering")
    with pytest.raises(ValueError, match="regression"):
        load_dataset(f"csv:{path}", task="regression")
    with pytest.raises((FileNotFoundError, ValueError), match="nope.csv"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_csv_integer_target_auto_task(tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    rows = ["a,b,label"] + [f"{i},{i * 2},{i % 4 + 1}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    b = load_dataset(f"csv:{path}", val_fraction=0, normalize=False)
    assert b.task == "classification" and b.class_names == ["1", "2", "3", "4"]
    assert set(_xy(b.train)[1].tolist()) == {0, 1, 2, 3}
    assert torch.equal(_xy(b.train)[0][:2], torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
