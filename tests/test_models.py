"""workbench.models: output shapes, MLP options, CNN input checks,
option validation and reproducible initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.models import MODELS, build_model, describe_models


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("out_features", [1, 10])
def test_every_model_maps_a_batch_to_finite_outputs_of_the_asked_width(name: str, out_features: int) -> None:
    model = build_model(name, in_features=64, out_features=out_features)
    out = model(torch.randn(5, 64))
    assert out.shape == (5, out_features)
    assert torch.isfinite(out).all()


def test_every_model_is_described() -> None:
    desc = describe_models()
    assert set(desc) == set(MODELS) and all(desc.values())


def test_mlp_structure_and_parameter_names() -> None:
    model = build_model("mlp", in_features=4, out_features=3, depth=2, width=8)
    assert isinstance(model.net, nn.Sequential)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["net.0.weight", "net.0.bias"]
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(4, 8), (8, 8), (8, 3)]
    assert model.net[-1] is linears[-1]
    assert isinstance(model.net[1], nn.ReLU)

    flat = build_model("mlp", in_features=4, out_features=2, depth=0)
    assert len(flat.net) == 1 and isinstance(flat.net[0], nn.Linear)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("norm", [None, "none", "batch", "layer"])
def test_mlp_activation_and_norm_options(activation: str, norm: str | None) -> None:
    model = build_model("mlp", in_features=6, out_features=2, depth=2, width=16,
                        activation=activation, norm=norm, dropout=0.3)
    kinds = [type(m).__name__ for m in model.net]
    block = kinds[:kinds.index("Linear", 1)]
    expected_norm = {"batch": ["BatchNorm1d"], "layer": ["LayerNorm"]}.get(norm or "none", [])
    assert block[0] == "Linear" and block[1:1 + len(expected_norm)] == expected_norm
    assert block[-1] == "Dropout"
    assert model(torch.randn(4, 6)).shape == (4, 2)


def test_deep_sigmoid_mlp_runs_and_gradients_vanish() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=8, out_features=2, depth=16, width=32,
                        activation="sigmoid", init="small")
    assert sum(isinstance(m, nn.Linear) for m in model.net) == 17
    x = torch.randn(16, 8)
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (16,)))
    loss.backward()
    first = model.net[0].weight.grad.abs().mean()
    last = model.net[-1].weight.grad.abs().mean()
    assert torch.isfinite(loss) and first < last * 1e-6  # the teaching point: early layers barely learn


def test_bias_init_and_weight_inits_set_the_layers_as_asked() -> None:
    model = build_model("mlp", in_features=5, out_features=3, depth=3, width=7, bias_init=-5.0)
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    for layer in linears[:-1]:
        assert torch.all(layer.bias == -5.0)
    assert not torch.all(linears[-1].bias == -5.0)  # output layer keeps its own bias
    # Dead ReLUs: with standardised inputs, almost every hidden unit is zero.
    h = model.net[:2](torch.randn(256, 5))
    assert (h == 0).float().mean() > 0.99

    small = build_model("mlp", in_features=50, out_features=3, depth=2, width=64, init="small")
    w = small.net[0].weight
    assert abs(w.std().item() - 0.01) < 0.002 and torch.all(small.net[0].bias == 0)
    for init in ("xavier", "kaiming"):
        m = build_model("mlp", in_features=50, out_features=3, init=init)
        assert torch.all(m.net[0].bias == 0) and m.net[0].weight.std() > 0.05


def test_same_seed_same_init() -> None:
    for name in MODELS:
        torch.manual_seed(123)
        a = build_model(name, in_features=64, out_features=10)
        torch.manual_seed(123)
        b = build_model(name, in_features=64, out_features=10)
        c = build_model(name, in_features=64, out_features=10)  # RNG moved on: differs
        for (na, pa), (nb, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
        assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_cnn_takes_flat_or_square_inputs_and_refuses_a_non_square_size() -> None:
    model = build_model("cnn", in_features=64, out_features=10, channels=4, dropout=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8)]
    assert model(torch.randn(3, 64)).shape == (3, 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert build_model("cnn", in_features=28 * 28, out_features=2)(torch.randn(2, 784)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"in_features.*30.*square.*mlp"):
        build_model("cnn", in_features=30, out_features=2)


def test_logreg_is_one_linear() -> None:
    model = build_model("logreg", in_features=13, out_features=3)
    assert [type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, type(model)))] == [nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 13 * 3 + 3


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("transformer", {}, r"model: unknown name 'transformer'; allowed: mlp, cnn, logreg"),
        ("mlp", {"widht": 3}, r"unknown option 'widht'; allowed: depth, width"),
        ("logreg", {"depth": 2}, r"unknown option 'depth'"),
        ("cnn", {"depth": 2}, r"unknown option 'depth'; allowed: channels, dropout"),
        ("mlp", {"depth": -1}, r"depth: -1"),
        ("mlp", {"depth": 2.5}, r"depth.*2.5"),
        ("mlp", {"width": 0}, r"width: 0"),
        ("mlp", {"activation": "swish"}, r"activation: unknown value 'swish'; allowed: relu, leaky_relu"),
        ("mlp", {"dropout": 1.0}, r"dropout: 1.0.*0 <= p < 1"),
        ("mlp", {"norm": "group"}, r"norm: unknown value 'group'; allowed: none, batch, layer"),
        ("mlp", {"init": "orthogonal"}, r"init: unknown value 'orthogonal'; allowed: default, xavier"),
        ("mlp", {"bias_init": "neg"}, r"bias_init.*'neg'"),
        ("cnn", {"channels": 0}, r"channels: 0"),
        ("cnn", {"dropout": -0.1}, r"dropout: -0.1"),
    ],
)
def test_bad_options_are_explained(name: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_model(name, in_features=64, out_features=3, **kwargs)


def test_bad_sizes_are_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="in_features"):
        build_model("mlp", in_features=0, out_features=2)
    with pytest.raises(ValueError, match="out_features"):
        build_model("logreg", in_features=3, out_features="2")
