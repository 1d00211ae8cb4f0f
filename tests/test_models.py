"""The model family: every preset, the config builder and its validation, the faithful LeNet-5."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from .conftest import assert_user_error, run_cli
from lenet.errors import ConfigError
from lenet.models.lenet5 import C3_TABLE, DIGIT_BITMAPS, LeNet5, digit_prototypes
from lenet.models import (LeNetConfig, MODELS, apply_overrides, build_lenet, create_model, param_count,
                          resolve_config)
from lenet.models.summary import spatial_path, trace
from lenet.training import TrainConfig, train

PRESETS = sorted(MODELS)


# --------------------------------------------------------------------------------------------
# Every preset


def test_the_three_presets_are_registered():
    assert {"classic", "modern", "lenet5"} <= set(MODELS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shape_trace_ends_in_one_score_per_class(name):
    rows = trace(create_model(name))
    assert rows[-1].shape == (1, 10)
    assert sum(r.params for r in rows) == param_count(create_model(name))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_backward_reaches_every_parameter_without_nan(name):
    torch.manual_seed(0)
    model = create_model(name)
    model.train()
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    scores = model(x)
    assert scores.shape == (8, 10) and torch.isfinite(scores).all()
    loss = (getattr(model, "criterion", None) or nn.functional.cross_entropy)(scores, y)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_with_more_output_units_than_classes(name):
    model = create_model(name, num_classes=20)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 20)


def test_classic_is_the_textbook_lenet():
    rows = trace(create_model("classic"))
    assert param_count(create_model("classic")) == 61_706
    assert spatial_path(rows) == [28, 28, 14, 10, 5, 400, 120, 84, 10]


def test_modern_is_the_modernised_skeleton_under_100k():
    model = create_model("modern")
    assert param_count(model) < 100_000
    kinds = {type(m) for m in model.modules()}
    assert {nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d} <= kinds
    assert nn.Sigmoid not in kinds and nn.AvgPool2d not in kinds
    cfg = MODELS["modern"].config
    assert (cfg.activation, cfg.pool, cfg.norm, cfg.init, cfg.head) == ("relu", "max", "batch", "he", "gap")


def test_presets_carry_a_recipe_that_explicit_fields_override():
    assert TrainConfig.for_model("classic") == TrainConfig()  # the book's recipe, unchanged
    modern = TrainConfig.for_model("modern")
    assert (modern.optimizer, modern.lr, modern.schedule) == ("momentum", 0.1, "onecycle")
    assert TrainConfig.for_model("modern", lr=0.05).lr == 0.05
    assert TrainConfig.for_model("lenet5").epochs == 20
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        TrainConfig.for_model("nope")


# --------------------------------------------------------------------------------------------
# The config builder: every field


@pytest.mark.parametrize("activation,pool,norm,init", list(itertools.product(
    ["sigmoid", "tanh", "scaled_tanh", "relu", "gelu"], ["avg", "max", "sub", "conv"],
    ["none", "batch", "layer"], ["xavier", "he", "default", "lecun"]))[::7])
def test_builder_accepts_every_choice(activation, pool, norm, init):
    model = build_lenet(LeNetConfig(activation=activation, pool=pool, norm=norm, init=init))
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("field,value,layer_type", [
    ("activation", "sigmoid", nn.Sigmoid), ("activation", "tanh", nn.Tanh), ("activation", "relu", nn.ReLU),
    ("activation", "gelu", nn.GELU), ("pool", "avg", nn.AvgPool2d), ("pool", "max", nn.MaxPool2d),
    ("norm", "batch", nn.BatchNorm2d), ("norm", "layer", nn.GroupNorm)])
def test_choices_build_the_named_layers(field, value, layer_type):
    model = create_model("classic", **{field: value})
    assert any(isinstance(m, layer_type) for m in model.modules())


def test_trainable_subsampling_and_strided_conv_pools():
    sub = create_model("classic", pool="sub", activation="scaled_tanh")
    assert param_count(sub) == 61_706 + 2 * (6 + 16)
    assert [n for n, _ in sub.named_children()][:4] == ["conv1", "act1", "pool1", "act1b"]
    conv = create_model("classic", pool="conv")
    assert isinstance(conv.pool1, nn.Conv2d) and conv.pool1.stride == (2, 2)
    assert conv(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_stages_kernels_and_dense_widths():
    three = create_model("classic", channels=(8, 16, 32), padding=(2, 2, 1), kernel_size=(5, 5, 3))
    assert [n for n, _ in three.named_children() if n.startswith("conv")] == ["conv1", "conv2", "conv3"]
    assert spatial_path(trace(three))[:8] == [28, 28, 14, 14, 7, 7, 3, 288]
    one = create_model("classic", channels=(6,), padding=(2,), dense=(50, 40, 30))
    assert [n for n, _ in one.named_children() if n.startswith("fc")] == ["fc1", "fc2", "fc3"]
    assert one.fc1.in_features == 6 * 14 * 14
    direct = create_model("classic", dense=())
    assert direct.out.in_features == 400
    gap = create_model("classic", head="gap", dense=())
    assert gap.out.in_features == 16
    k3 = create_model("classic", kernel_size=(3,), padding=(1, 0))
    assert trace(k3)[0].shape == (1, 6, 28, 28) and k3.conv2.kernel_size == (3, 3)


def test_init_schemes():
    torch.manual_seed(0)
    lecun = create_model("classic", init="lecun")
    bound = 2.4 / 25
    assert lecun.conv1.weight.abs().max() <= bound and lecun.conv1.bias.abs().max() <= bound
    he = create_model("classic", init="he", activation="relu")
    assert torch.all(he.conv1.bias == 0)
    std = he.fc1.weight.std().item()
    assert abs(std - (2 / 400) ** 0.5) < 0.01


def test_dropout_layers_only_when_asked():
    assert not any(isinstance(m, nn.Dropout) for m in create_model("classic").modules())
    model = create_model("classic", dropout=0.5)
    assert [n for n, m in model.named_children() if isinstance(m, nn.Dropout)] == ["drop1", "drop2"]
    head_only = create_model("classic", dropout=0.3, dense=())
    assert [n for n, m in head_only.named_children() if isinstance(m, nn.Dropout)] == ["drop"]


# --------------------------------------------------------------------------------------------
# Validation: configs that cannot work


@pytest.mark.parametrize("overrides,fragments", [
    ({"kernel_size": (5, 5, 7), "channels": (6, 16, 16), "padding": (2, 0, 0)},
     ["conv3", "7x7 kernel", "5x5 map", "pool2"]),
    ({"kernel_size": (11,), "padding": (0,)}, ["conv2", "11x11 kernel", "9x9 map", "pool1"]),
    ({"kernel_size": (31,), "padding": (0,)}, ["conv1", "31x31 kernel", "28x28 map", "the input"]),
    ({"channels": (6, 16, 16, 16, 16), "padding": (2,)}, ["pool5", "1x1 map", "conv5"]),
    ({"activation": "swish"}, ["activation 'swish'", "relu"]),
    ({"pool": "median"}, ["pool 'median'", "sub", "conv"]),
    ({"norm": "group"}, ["norm 'group'", "batch", "layer"]),
    ({"init": "orthogonal"}, ["init 'orthogonal'", "lecun"]),
    ({"head": "attention"}, ["head 'attention'", "gap"]),
    ({"kernel_size": (5, 5, 5)}, ["kernel_size has 3 values for 2 conv stages"]),
    ({"channels": (6, 16, 32)}, ["padding has 2 values for 3 conv stages"]),
    ({"channels": ()}, ["channels is empty"]),
    ({"channels": (6, 0)}, ["must all be >= 1"]),
    ({"dense": (120, 0)}, ["must all be >= 1"]),
    ({"dropout": 1.0}, ["dropout 1.0", "[0, 1)"]),
    ({"num_classes": 1}, ["num_classes 1", "at least 2"]),
    ({"kernel_size": (0,)}, ["conv1", "kernel 0"]),
])
def test_impossible_configs_are_refused_with_the_layer_and_sizes(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        create_model("classic", **overrides)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_overrides_are_coerced_from_cli_text():
    cfg = apply_overrides(LeNetConfig(), {"channels": "8,16,32", "padding": "2,2,0", "kernel_size": "5",
                                          "dense": "none", "dropout": "0.25", "num_classes": "12",
                                          "activation": "gelu"})
    assert cfg.channels == (8, 16, 32) and cfg.padding == (2, 2, 0) and cfg.kernel_size == (5,)
    assert cfg.dense == () and cfg.dropout == 0.25 and cfg.num_classes == 12 and cfg.activation == "gelu"
    assert apply_overrides(LeNetConfig(), {"dense": "[]"}).dense == ()
    assert apply_overrides(LeNetConfig(), {"dense": 64}).dense == (64,)
    with pytest.raises(ConfigError, match="--set dropout=lots: expected float"):
        apply_overrides(LeNetConfig(), {"dropout": "lots"})
    with pytest.raises(ConfigError, match="--set channels=a,b: expected comma-separated integers"):
        apply_overrides(LeNetConfig(), {"channels": "a,b"})
    with pytest.raises(ConfigError, match="unknown model setting 'colour'"):
        apply_overrides(LeNetConfig(), {"colour": "red"})
    with pytest.raises(ConfigError, match="unknown model setting 'pool' for LeNet5Config"):
        resolve_config("lenet5", {"pool": "max"})


# --------------------------------------------------------------------------------------------
# LeNet-5 as published


PAPER_PARAMS = {"c1": 156, "s2": 12, "c3": 1_516, "s4": 32, "c5": 48_120, "f6": 10_164}


def test_lenet5_per_layer_parameters_are_the_papers():
    rows = {r.name: r for r in trace(create_model("lenet5"))}
    for layer, params in PAPER_PARAMS.items():
        assert rows[layer].params == params, layer
    assert sum(r.params for r in rows.values()) == sum(PAPER_PARAMS.values()) == 60_000
    assert rows["rbf"].params == 0


def test_lenet5_shapes_follow_the_paper():
    rows = {r.name: r.shape for r in trace(create_model("lenet5"))}
    assert rows["input"] == (1, 1, 32, 32)
    assert rows["c1"] == (1, 6, 28, 28) and rows["s2"] == (1, 6, 14, 14)
    assert rows["c3"] == (1, 16, 10, 10) and rows["s4"] == (1, 16, 5, 5)
    assert rows["c5"] == (1, 120, 1, 1) and rows["f6"] == (1, 84) and rows["output"] == (1, 10)


def test_lenet5_input_is_padded_and_scaled_inside_the_model():
    net = create_model("lenet5")
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 10] = 1.0
    y = net.input(x)
    assert y.shape == (1, 1, 32, 32)
    assert y[0, 0, 12, 12].item() == pytest.approx(1.175)
    assert torch.allclose(y[0, 0, 0], torch.full((32,), -0.1))  # the padding is background too
    assert y[0, 0, 5, 5].item() == pytest.approx(-0.1)


def test_lenet5_c3_connection_table():
    assert len(C3_TABLE) == 16 and [len(t) for t in C3_TABLE] == [3] * 6 + [4] * 9 + [6]
    assert C3_TABLE[:6] == ((0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5))
    assert C3_TABLE[6:12] == ((0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5))
    assert C3_TABLE[12:] == ((0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5), (0, 1, 2, 3, 4, 5))
    c3 = create_model("lenet5").c3
    dense = c3.dense_weight().detach()
    connected = dense.abs().sum(dim=(2, 3)) != 0
    expected = torch.zeros(16, 6, dtype=torch.bool)
    for o, inputs in enumerate(C3_TABLE):
        expected[o, list(inputs)] = True
    assert torch.equal(connected, expected)
    # An unconnected S2 map cannot influence a C3 map: perturb S2 map 3 and look at C3 map 0.
    x = torch.rand(1, 6, 14, 14)
    x2 = x.clone()
    x2[0, 3] += 1.0
    out, out2 = c3(x), c3(x2)
    assert torch.equal(out[0, 0], out2[0, 0]) and not torch.equal(out[0, 1], out2[0, 1])


def test_lenet5_rbf_prototypes_are_fixed_digit_bitmaps():
    net = create_model("lenet5")
    protos = net.rbf.prototypes
    assert protos.shape == (10, 84) and set(protos.unique().tolist()) == {-1.0, 1.0}
    assert all(len(b) == 12 and all(len(row) == 7 for row in b) for b in DIGIT_BITMAPS)
    assert torch.equal(protos, digit_prototypes(10))
    distances = torch.cdist(protos, protos, p=1) / 2  # Hamming distances between the bitmaps
    assert distances[~torch.eye(10, dtype=torch.bool)].min() >= 6  # closest pair: 3 and 8
    assert "rbf.prototypes" not in dict(net.named_parameters())
    before = protos.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scores = net(torch.rand(4, 1, 28, 28))
    net.criterion(scores, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(net.rbf.prototypes, before)
    assert torch.equal(digit_prototypes(20)[:10], protos)  # extra units get extra fixed codes
    assert digit_prototypes(20).shape == (20, 84)


def test_lenet5_scores_are_negative_penalties_and_the_loss_is_the_papers():
    torch.manual_seed(0)
    net = create_model("lenet5", j=2.0)
    x = torch.rand(5, 1, 28, 28)
    features = net.curvature_outputs(x)
    penalties = ((features[:, None, :] - net.rbf.prototypes[None]) ** 2).sum(-1)
    scores = net(x)
    assert torch.allclose(scores, -penalties, atol=1e-4)
    labels = torch.tensor([3, 1, 4, 1, 5])
    expected = torch.stack([penalties[i, labels[i]] + torch.log(torch.exp(torch.tensor(-2.0))
                                                                + torch.exp(-penalties[i]).sum())
                            for i in range(5)]).mean()
    assert torch.allclose(net.criterion(scores, labels), expected, atol=1e-4)
    # a perfect F6 output (the class's bitmap) is classified as that class
    assert net.rbf(net.rbf.prototypes).argmin(dim=1).tolist() == list(range(10))


def test_lenet5_rbf_gradient_is_autograd_s():
    """The RBF layer computes its input gradient as two matrix products; it equals the gradient
    autograd takes through the differences (gradcheck in float64, and in float32 on a batch)."""
    from lenet.models.lenet5 import _SquaredDistances, squared_distances

    torch.manual_seed(0)
    protos = digit_prototypes(10).double()
    x = (torch.rand(6, 84, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _SquaredDistances.apply(t, protos), (x,))
    rbf = create_model("lenet5").rbf
    x32 = (torch.rand(33, 84) * 3 - 1.5).requires_grad_()
    grad = torch.randn(33, 10)
    rbf(x32).backward(grad)
    x_ref = x32.detach().clone().requires_grad_()
    squared_distances(x_ref, rbf.prototypes).backward(grad)
    assert torch.allclose(x32.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # without a gradient to take, the plain formula, the same values
        assert torch.equal(rbf(x32), squared_distances(x32, rbf.prototypes))


def test_lenet5_initialisation_is_uniform_in_2_4_over_fan_in():
    torch.manual_seed(0)
    net = create_model("lenet5")
    assert net.c1.weight.abs().max() <= 2.4 / 25 and net.c5.weight.abs().max() <= 2.4 / 400
    assert net.f6.weight.abs().max() <= 2.4 / 120 and net.f6.bias.abs().max() <= 2.4 / 120
    assert net.f6.weight.abs().max() > 0.9 * 2.4 / 120  # uniform over the whole range
    for k, inputs in enumerate(C3_TABLE):
        w = net.c3.dense_weight()[k]
        assert w.abs().max() <= 2.4 / (25 * len(inputs))
    assert net.s2.weight.abs().max() <= 2.4 / 4


def test_lenet5_is_a_plain_module_that_round_trips_its_state():
    net = create_model("lenet5")
    clone = LeNet5()
    clone.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(net(x), clone(x))


def test_lenet5_trains_with_its_own_criterion_and_extra_output_units():
    from lenet.data import synthetic_dataset

    data = synthetic_dataset(n_train=256, n_test=128)
    result = train(TrainConfig.for_model("lenet5", epochs=2, overrides={"num_classes": 14}), data=data)
    assert result.model(torch.rand(1, 1, 28, 28)).shape == (1, 14)
    losses = [m.train_loss for m in result.history]
    assert losses[1] < losses[0]  # the paper's loss goes down (learning MNIST is measured in the docs)


# --------------------------------------------------------------------------------------------
# The CLI


def test_cli_summary_with_overrides():
    proc = run_cli("summary", "--set", "pool=max", "--set", "activation=relu", "--set", "channels=8,16",
                   "--set", "dense=64")
    assert proc.returncode == 0, proc.stderr
    assert "MaxPool2d" in proc.stdout and "ReLU" in proc.stdout and "(1, 8, 28, 28)" in proc.stdout
    assert "fc2" not in proc.stdout


def test_cli_summary_lenet5_reads_like_the_paper():
    proc = run_cli("summary", "--model", "lenet5")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for layer, params in PAPER_PARAMS.items():
        assert f" {params:,} " in lines[layer], lines[layer]
    assert "total: 60,000 trainable parameters" in proc.stdout


def test_cli_unknown_setting_is_one_line_error():
    assert_user_error(run_cli("summary", "--set", "colour=red"), "unknown model setting 'colour'",
                      "known settings are")
    assert_user_error(run_cli("train", "--set", "colour=red"), "unknown model setting 'colour'")
    assert_user_error(run_cli("train", "--model", "lenet5", "--set", "pool=max"), "unknown model setting 'pool'")


def test_cli_impossible_config_is_one_line_error():
    proc = run_cli("train", "--set", "kernel_size=5,5,7", "--set", "channels=6,16,16", "--set", "padding=2,0,0")
    assert_user_error(proc, "conv3", "7x7 kernel", "5x5 map")
    assert_user_error(run_cli("summary", "--set", "dropout=lots"), "--set dropout=lots", "expected float")
    assert_user_error(run_cli("summary", "--set", "nokey"), "not key=value", code=2)
    assert_user_error(run_cli("train", "--num-classes", "12", "--set", "num_classes=20"),
                      "--num-classes 12 contradicts --set num_classes=20")


def test_cli_models_lists_presets_with_recipes():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    assert "61,706" in proc.stdout and "60,000" in proc.stdout and "modern" in proc.stdout
    assert "optimizer momentum" in proc.stdout


def test_cli_train_with_overrides_and_num_classes(mnist, tmp_path):
    out = tmp_path / "run"
    # a deliberately tiny network and big batches: one epoch of MNIST in a few seconds
    proc = run_cli("train", "--dataset", "mnist", "--epochs", "1", "--set", "pool=max", "--set", "activation=relu",
                   "--set", "channels=4,8", "--set", "dense=32", "--num-classes", "12", "--lr", "0.2",
                   "--batch-size", "512", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["pool"] == "max" and config["model_config"]["num_classes"] == 12
    assert config["model_config"]["channels"] == [4, 8] and config["model_config"]["dense"] == [32]
    assert config["train"]["lr"] == 0.2 and config["train"]["optimizer"] == "sgd"  # no recipe for classic
    assert float(proc.stdout.split("test acc ")[-1].split()[0]) > 0.5


@pytest.mark.parametrize("name", ["modern", "lenet5"])
def test_presets_round_trip_through_a_run_folder(name, tmp_path):
    from lenet.data import synthetic_dataset
    from lenet.training.runs import load_run

    data = synthetic_dataset(n_train=64, n_test=32)
    result = train(TrainConfig.for_model(name, epochs=1, overrides={"num_classes": 11}), data=data,
                   out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    x = torch.rand(3, 1, 28, 28)
    result.model.eval()
    assert torch.allclose(run.model(x), result.model(x), atol=1e-5)
    assert run.config["model_config"]["num_classes"] == 11


def test_evaluate_counts_predictions_of_extra_output_units_as_wrong():
    from lenet.inspect.evaluation import evaluate

    class Fixed(nn.Module):  # predicts unit 15 for the first image, the true class for the others
        def forward(self, x):
            scores = torch.zeros(x.shape[0], 20)
            scores[torch.arange(x.shape[0]), torch.tensor([15, 1, 2, 3])[: x.shape[0]]] = 1.0
            return scores

    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    report = evaluate(Fixed(), images, torch.tensor([0, 1, 2, 3]), tuple(str(i) for i in range(10)))
    assert report.accuracy == 0.75 and report.extra_predictions == 1
    assert report.per_class[:4] == [0.0, 1.0, 1.0, 1.0]
    assert report.confusion.shape == (10, 10) and int(report.confusion.sum()) == 3
    assert "on 4 images" in report.format() and "1 images were predicted" in report.format()


def test_input_size_settings_summary_and_mismatch_with_the_data():
    proc = run_cli("summary", "--set", "in_size=32", "--set", "in_channels=3")
    assert proc.returncode == 0, proc.stderr
    assert "input (1, 3, 32, 32)" in proc.stdout and "sizes: 32 -> 32 -> 16 -> 12 -> 6 -> 576" in proc.stdout
    from lenet.data import synthetic_dataset

    with pytest.raises(ConfigError, match="in_size 32 and in_channels 1 do not match the 1x28x28 images"):
        train(TrainConfig(epochs=1, overrides={"in_size": 32}), data=synthetic_dataset(32, 16))
