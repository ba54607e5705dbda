"""Teaching scenarios: named runs that show one training pathology each (or a healthy run to compare with).

Each says what to watch for and which alert should fire; ``workbench train --scenario NAME`` starts one,
``scenario_config(NAME)`` gives its config. The scenario test suite (tests/scenarios/) runs them all and
checks that the expected alert fires in time and that healthy runs stay quiet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import TrainConfig


@dataclass(frozen=True)
class Scenario:
    """A preset run: its config, the alert kind it should raise (None for healthy) and within how many steps."""

    name: str
    title: str
    watch: str
    config: dict[str, Any]
    expect: str | None = None
    within: int | None = None
    also: tuple[str, ...] = field(default_factory=tuple)   # related symptoms that may fire as well


_BASE = dict(eval_every=20, seed=0)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    # ---------------------------------------------------------------- pathologies
    Scenario("lr_too_high", "Learning rate far too high (SGD)",
             "The loss shoots up and becomes NaN within a few dozen steps; the divergence alert pauses the run.",
             # at lr 3 the first steps kill the ReLUs before the loss turns NaN on about one seed in six (the
             # lr_kills_relus case); at 10 every seed reaches NaN, which is what this scenario teaches
             dict(_BASE, dataset="digits", model="mlp", optimizer="sgd", lr=10.0, momentum=0.9, max_steps=300,
                  max_epochs=None),
             expect="divergence", within=100,
             also=("loss_spike", "exploding_gradients", "lr_too_high", "dead_units", "underfitting", "plateau")),
    Scenario("lr_kills_relus", "Learning rate too high (SGD): the first steps kill the ReLUs",
             "The loss jumps, then sits at chance level: most ReLU units never fire again, the updates shrink to "
             "nothing — it looks like a too-low lr, but the lr killed the run.",
             dict(_BASE, dataset="digits", model="mlp", optimizer="sgd", lr=1.0, momentum=0.9, max_steps=400,
                  max_epochs=None),
             expect="lr_too_high", within=300,
             also=("dead_units", "underfitting", "plateau", "vanishing_gradients", "loss_spike", "divergence",
                   "exploding_gradients")),
    Scenario("oscillating_lr", "Learning rate too high (Adam): the loss bounces instead of falling",
             "Big weight updates (update/weight ratio far above 1e-3) and a loss that will not settle.",
             dict(_BASE, dataset="digits", model="mlp", optimizer="adam", lr=0.1, max_steps=400, max_epochs=None),
             expect="lr_too_high", within=400,
             also=("loss_spike", "plateau", "underfitting", "divergence", "exploding_gradients", "overfitting",
                   "dead_units")),
    Scenario("deep_sigmoid", "Deep sigmoid network: vanishing gradients",
             "The per-layer gradient heatmap fades towards the first layers; the loss hardly moves.",
             dict(_BASE, dataset="digits", model="mlp", model_options={"depth": 14, "activation": "sigmoid"},
                  optimizer="sgd", lr=0.1, momentum=0.9, max_steps=300, max_epochs=None),
             expect="vanishing_gradients", within=100, also=("underfitting", "plateau", "lr_too_low")),
    Scenario("tiny_data_overfit", "Small data, big model: overfitting",
             "Train loss keeps falling while val loss turns and climbs: the gap opens.",
             dict(_BASE, dataset="digits", dataset_options={"n_samples": 150}, model="mlp",
                  model_options={"width": 512, "depth": 3}, lr=1e-3, max_steps=800, max_epochs=None),
             expect="overfitting", within=800, also=("plateau",)),
    Scenario("random_labels", "Labels carry no signal: underfitting",
             "The loss stays at chance level log(10) = 2.30 however long you train.",
             dict(_BASE, dataset="digits", dataset_options={"random_labels": True}, model="logreg", lr=1e-3,
                  max_steps=400, max_epochs=None),
             expect="underfitting", within=400, also=("plateau", "overfitting", "lr_too_low")),
    Scenario("unnormalized_inputs", "Raw, unscaled features (x1000)",
             "Pre-flight data checks flag the feature scales before the first step.",
             dict(_BASE, dataset="wine", normalize=False, dataset_options={"scale": 1000.0}, model="mlp",
                  optimizer="sgd", lr=1e-3, max_steps=200, max_epochs=None),
             expect="unnormalized_inputs", within=0,
             also=("divergence", "lr_too_high", "loss_spike", "exploding_gradients", "underfitting", "plateau",
                   "dead_units", "vanishing_gradients", "overfitting", "lr_too_low")),
    Scenario("nan_inputs", "Missing values (NaN) in the inputs",
             "Pre-flight checks flag the NaNs; then the loss turns NaN at the first batch that holds one.",
             dict(_BASE, dataset="digits", dataset_options={"nan_fraction": 0.02}, model="mlp", max_steps=100,
                  max_epochs=None),
             expect="nan_inputs", within=0, also=("divergence",)),
    Scenario("dead_relu", "Dead ReLUs from a large negative bias",
             "Most hidden units never fire, so their layers get no gradient and the loss stalls.",
             dict(_BASE, dataset="digits", model="mlp", model_options={"bias_init": -5.0}, lr=1e-3, max_steps=300,
                  max_epochs=None),
             expect="dead_units", within=100, also=("underfitting", "plateau", "vanishing_gradients", "lr_too_low")),
    Scenario("lr_too_low", "Learning rate far too low",
             "The weights barely move (update/weight ratio around 1e-6) and the loss crawls.",
             dict(_BASE, dataset="digits", model="mlp", optimizer="sgd", lr=1e-5, momentum=0.0, max_steps=300,
                  max_epochs=None),
             expect="lr_too_low", within=300, also=("underfitting", "plateau")),
    Scenario("leaky_split", "Train/val leakage: duplicates across the split",
             "Pre-flight checks find validation rows copied into the training set; val scores are too good.",
             dict(_BASE, dataset="digits", dataset_options={"duplicate_fraction": 0.5}, model="mlp", max_steps=200,
                  max_epochs=None),
             expect="data_leakage", within=0, also=("overfitting", "plateau")),
    Scenario("label_noise", "40% wrong labels, a wide model, trained long",
             "The model first learns the real pattern, then memorises the wrong labels: val loss climbs.",
             dict(_BASE, dataset="digits", dataset_options={"label_noise": 0.4}, model="mlp",
                  model_options={"width": 512, "depth": 2}, lr=2e-3, max_steps=1500, max_epochs=None,
                  eval_every=25),
             # Memorising at a constant lr, Adam can turn unstable once the train loss nears zero: on some CPU
             # kernels' trajectories the loss then spikes and climbs 30-100x around step 1000. That is a real
             # too-high lr for this phase (lowering the lr 10x at step 800 removes it), so it may be reported.
             expect="overfitting", within=1500, also=("plateau", "underfitting", "lr_too_high", "loss_spike")),
    # ---------------------------------------------------------------- healthy runs (no warning should fire)
    Scenario("healthy", "A healthy run: digits, MLP, Adam",
             "Loss falls smoothly, val loss follows, update/weight ratios near 1e-3. Nothing to fix.",
             dict(_BASE, dataset="digits", model="mlp", lr=1e-3, max_steps=250, max_epochs=None)),
    Scenario("healthy_wine", "Healthy: wine, MLP",
             "A small tabular problem learnt cleanly.",
             dict(_BASE, dataset="wine", model="mlp", batch_size=32, lr=1e-3, max_steps=200, max_epochs=None)),
    Scenario("healthy_logreg", "Healthy: breast cancer, logistic regression",
             "A linear model on a nearly linearly separable problem.",
             dict(_BASE, dataset="breast_cancer", model="logreg", lr=1e-2, max_steps=250, max_epochs=None)),
    Scenario("healthy_moons", "Healthy: two moons, MLP",
             "A curved decision boundary in 2-D.",
             dict(_BASE, dataset="moons", model="mlp", lr=3e-3, max_steps=300, max_epochs=None)),
    Scenario("healthy_spirals", "Healthy: three spirals, wider MLP",
             "A hard 2-D problem that needs depth and width.",
             dict(_BASE, dataset="spirals", model="mlp", model_options={"width": 128, "depth": 3}, lr=3e-3,
                  max_steps=500, max_epochs=None)),
    Scenario("healthy_cnn", "Healthy: digits, small CNN",
             "Convolutions on 8x8 images.",
             dict(_BASE, dataset="digits", model="cnn", lr=1e-3, max_steps=250, max_epochs=None)),
    Scenario("healthy_regression", "Healthy: regression, MLP",
             "Mean squared error on a smooth nonlinear target.",
             dict(_BASE, dataset="regression", model="mlp", lr=1e-3, max_steps=300, max_epochs=None)),
]}


def get(name: str) -> Scenario:
    """The scenario called ``name``; an unknown name lists the known ones."""
    if name not in SCENARIOS:
        raise ValueError(f"scenario: got {name!r}; allowed: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def scenario_config(name: str, **overrides: Any) -> TrainConfig:
    """The scenario's TrainConfig, with fields overridden (e.g. runs_root, seed)."""
    return TrainConfig.from_dict({**get(name).config, **overrides})
