"""The batch-last CPU conv kernels: exact against PyTorch, used where they apply, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lenet.kernels import ops as blconv
from lenet.training import engine
from lenet.models import create_model
from lenet.models.layers import ScaledTanh
from lenet.training import TrainConfig, train


def require_compiler() -> None:
    """Skip where there is no C++ compiler to build the kernels: the one reason to skip."""
    if blconv._compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++) to build the batch-last kernels")


def require_kernels():
    """The kernels' library, for a test that needs it.

    Skips only where there is no C++ compiler to build them. Where there is one, kernels that did
    not build, or that built but failed their self-check against PyTorch, fail the test with the
    reason: a kernel bug must show up as a failure, never as a skip. Called from a fixture (not at
    collection time), so a build goes to the test's own isolated cache, never the user's.
    """
    require_compiler()
    lib = blconv.library()
    if lib is None:
        pytest.fail(f"a C++ compiler is here but the batch-last kernels are unavailable: {blconv.problem()}",
                    pytrace=False)
    return lib


@pytest.fixture
def _kernels():
    return require_kernels()


needs_kernels = pytest.mark.usefixtures("_kernels")


def _to_bl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 3, 0).contiguous()


def _from_bl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(3, 0, 1, 2)


# Each activation and pooling by name: (its code, as the compiled kernels report it; PyTorch's function).
def act_of(name: str):
    c = blconv.constants()
    return {"none": (c.act_none, lambda z: z), "sigmoid": (c.activations[nn.Sigmoid], torch.sigmoid),
            "tanh": (c.activations[nn.Tanh], torch.tanh), "relu": (c.activations[nn.ReLU], torch.relu),
            "scaled_tanh": (c.activations[ScaledTanh], ScaledTanh())}[name]


def pool_of(name: str):
    c = blconv.constants()
    return {"none": (c.pool_none, lambda a, k: a), "avg": (c.pool_avg, F.avg_pool2d),
            "max": (c.pool_max, F.max_pool2d)}[name]


def _block_against_pytorch(cin, cout, size, k, pad, batch, act="none", pool="none", window=2, keep=False):
    g = torch.Generator().manual_seed(cin * 100 + k + size)
    x = torch.randn(batch, cin, size, size, generator=g, requires_grad=True)
    # Weights at an initialised layer's scale: saturated activations would tie in max pooling
    # (equal in float32, a coin toss between PyTorch's rounding and the kernels').
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).requires_grad_()
    b = torch.randn(cout, generator=g, requires_grad=True)
    (act_code, act_fn), (pool_code, pool_fn) = act_of(act), pool_of(pool)
    want = pool_fn(act_fn(F.conv2d(x, w, b, padding=pad)), window)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    want_grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None

    xb = _to_bl(x.detach()).requires_grad_()
    got = blconv.ConvBlock.apply(blconv.pad_cols(xb, pad), w, b, pad, act_code, pool_code, window, keep)
    got.backward(_to_bl(grad))
    torch.testing.assert_close(_from_bl(got.detach()), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_from_bl(xb.grad), want_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, want_grads[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad, want_grads[2], rtol=1e-4, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("cin,cout,size,k,pad,batch", [
    (1, 6, 28, 5, 2, 32),     # LeNet's conv1
    (6, 16, 14, 5, 0, 16),    # LeNet's conv2
    (3, 8, 14, 3, 1, 16),     # the 3x3 exercise
    (6, 16, 14, 7, 3, 16),    # the 7x7 exercise
    (2, 11, 9, 3, 2, 16),     # a prime channel count (blocks of 1), padding > k // 2
    (4, 5, 6, 1, 0, 48),      # 1x1
    (5, 3, 7, 5, 4, 16),      # padding k - 1: the shape of an input gradient
])
def test_convolution_and_gradients_equal_pytorch(cin, cout, size, k, pad, batch):
    _block_against_pytorch(cin, cout, size, k, pad, batch)


POOLS = [("avg", 2, 14), ("max", 2, 14), ("avg", 3, 11), ("max", 3, 11), ("max", 2, 9), ("none", 1, 10)]


def _keeps(act: str, pool: str) -> bool:  # a pooled block whose backward needs its activation
    return pool != "none" and (act != "none" or pool == "max")


@needs_kernels
@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept"])
@pytest.mark.parametrize("act,pool,window,size", [(a, *p) for a in ("none", "sigmoid", "tanh", "relu", "scaled_tanh")
                                                  for p in POOLS])
def test_fused_activation_and_pooling_equal_pytorch(act, pool, window, size, keep):
    """Odd sizes check the floor of pooling: the cells it drops get zero gradient. The backward
    pass either recomputes the activation or reads the one the forward pass kept: both exact."""
    if keep and not _keeps(act, pool):
        keep = False  # (nothing to keep: the same case as "recomputed")
    _block_against_pytorch(3, 6, size, 3, 1, 32, act, pool, window, keep)


@needs_kernels
@pytest.mark.parametrize("act,pool", [("sigmoid", "avg"), ("relu", "max"), ("none", "max")])
@pytest.mark.parametrize("batch", [48, 16])  # 3 chunks over 2 threads; one chunk, one thread idle
def test_the_backward_pass_reads_the_kept_activation(act, pool, batch):
    """The kept activation is what the backward pass uses: exact against PyTorch at an uneven
    split of the batch's chunks, and with the kept maps overwritten, the gradients change."""
    _block_against_pytorch(6, 16, 14, 5, 0, batch, act, pool, 2, keep=True)
    x = torch.randn(6, 14, 14, batch, requires_grad=True)
    w = (torch.randn(16, 6, 5, 5) / 150 ** 0.5).requires_grad_()
    grads = []
    for poison in (False, True):
        out = blconv.ConvBlock.apply(x, w, None, 0, act_of(act)[0], pool_of(pool)[0], 2, True)
        kept = out.grad_fn.saved_tensors[3]
        assert kept is not None and kept.numel() == 16 * 10 * 10 * batch
        if poison:
            kept.data.fill_(0.5)  # every window a tie, every derivative a constant
        x.grad = w.grad = None
        out.backward(torch.ones_like(out))
        grads.append((x.grad.clone(), w.grad.clone()))
    assert not torch.allclose(grads[0][0], grads[1][0]) and not torch.allclose(grads[0][1], grads[1][1])


@needs_kernels
def test_blocks_beyond_the_fan_in_limit_keep_their_activation(monkeypatch):
    """conv2 (fan-in 150) keeps its activation for the backward pass while training; conv1 (25)
    recomputes it; nothing is kept without gradients (evaluation)."""
    seen = []
    real = blconv.ConvBlock.apply
    net, _ = blconv.batch_last(create_model("classic"))
    x = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(blconv.ConvBlock, "apply", lambda *args: seen.append(args[7]) or real(*args))
    out = net(x)
    assert [n.saved_tensors[3] is not None for n in _conv_block_nodes(out)] == [True, False]  # conv2, then conv1
    out.sum().backward()
    with torch.no_grad():
        net(x)
    assert seen == [False, True, False, False]


def _conv_block_nodes(out: torch.Tensor) -> list:
    """The ConvBlock nodes of out's graph, from the output back."""
    found, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "ConvBlockBackward":
            found.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return found


@needs_kernels
@pytest.mark.parametrize("act", ["none", "sigmoid", "tanh", "relu", "scaled_tanh"])
@pytest.mark.parametrize("fin,fout,batch", [(400, 120, 256), (13, 7, 48), (84, 10, 16)])
def test_dense_layer_and_gradients_equal_pytorch(act, fin, fout, batch):
    """Output counts that are not multiples of the 6-wide register block, odd input counts."""
    g = torch.Generator().manual_seed(fin + fout)
    x = torch.randn(batch, fin, generator=g, requires_grad=True)
    w = torch.randn(fout, fin, generator=g, requires_grad=True)
    b = torch.randn(fout, generator=g, requires_grad=True)
    code, fn = act_of(act)
    want = fn(F.linear(x, w, b))
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    want_grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    xt = x.detach().t().contiguous().requires_grad_()
    got = blconv.DenseBlock.apply(xt, w, b, code)
    got.backward(grad.t())
    torch.testing.assert_close(got.t(), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xt.grad.t(), want_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, want_grads[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad, want_grads[2], rtol=1e-4, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("act", ["none", "relu", "sigmoid", "scaled_tanh"])
@pytest.mark.parametrize("pool,window,size", [("none", 1, 10), ("max", 2, 14), ("avg", 2, 9), ("max", 3, 11)])
def test_affine_block_and_gradients_equal_pytorch(act, pool, window, size):
    """pool(act(s z + t)) per channel: BatchNorm's second half, and LeNet-5's subsampling scale."""
    g = torch.Generator().manual_seed(size * 10 + window)
    z = torch.randn(32, 5, size, size, generator=g, requires_grad=True)
    s = torch.randn(5, generator=g, requires_grad=True)
    t = torch.randn(5, generator=g, requires_grad=True)
    (act_code, act_fn), (pool_code, pool_fn) = act_of(act), pool_of(pool)
    want = pool_fn(act_fn(z * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)), window)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    want_grads = [u.grad.clone() for u in (z, s, t)]
    for u in (z, s, t):
        u.grad = None
    zb = _to_bl(z.detach()).requires_grad_()
    got = blconv.AffineBlock.apply(zb, s, t, act_code, pool_code, window)
    got.backward(_to_bl(grad))
    torch.testing.assert_close(_from_bl(got.detach()), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_from_bl(zb.grad), want_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.grad, want_grads[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(t.grad, want_grads[2], rtol=1e-4, atol=1e-3)


def _model_and_runner_agree(model, x, training: bool):
    """Forward, every parameter gradient and every buffer (BatchNorm's running statistics) of the
    runner against the model itself in float64, from the same state, in training or evaluation
    mode. Float64 is the reference because gradients through two BatchNorms lose digits in float32:
    PyTorch's own float32 conv1 weight gradient of `modern` is 7e-4 (relative to its largest
    entry) from float64, the kernels' 8e-6 (measured, batch 48)."""
    import copy

    ref, ref32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    for net in (model, ref, ref32):
        net.train(training)
    outputs = []
    for net, inp in ((ref, x.double()), (ref32, x), (runner, x)):
        y = net(inp)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        outputs.append(y.detach())

    def close(a, b, b32, what):
        """To 5e-4 of the tensor's largest entry, or as close as PyTorch's float32 gets: max pooling
        routes a gradient to another cell wherever two values of a window are within rounding of
        each other, in float32 as in the kernels (measured: up to 1.5e-4 for `modern`'s conv2
        weight gradient at batch 48; PyTorch's own float32 conv1 gradient is 4e-4 off). A wrong
        formula is off by far more: leaving out the mean's share of BatchNorm's gradient puts `modern`'s
        conv weight gradients 0.67-0.94 off (measured)."""
        err, err32 = (a.double() - b).abs().max().item(), (b32.double() - b).abs().max().item()
        assert err <= max(1e-6 + 5e-4 * b.abs().max().item(), 3 * err32), \
            f"{what} differs by {err:.3g} (PyTorch's float32: {err32:.3g})"

    close(outputs[2], outputs[0], outputs[1], "the output")
    for (name, p), q, q32 in zip(model.named_parameters(), ref.parameters(), ref32.parameters()):
        close(p.grad, q.grad, q32.grad, f"the gradient of {name}")
    for (name, b), c, c32 in zip(model.named_buffers(), ref.buffers(), ref32.buffers()):
        close(b, c, c32, name)
    return runner


@needs_kernels
@pytest.mark.parametrize("name,overrides", [("lenet5", {}), ("modern", {}), ("classic", {"norm": "batch"}),
                                            ("classic", {"norm": "batch", "activation": "tanh", "pool": "avg"}),
                                            ("classic", {"pool": "sub", "activation": "scaled_tanh"})])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch", [7, 48])  # 7: padded to 16 lanes inside; BatchNorm must not count the padding
def test_the_family_runs_on_the_kernels_and_equals_pytorch(name, overrides, training, batch):
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    if not training:  # evaluation mode uses running statistics: make them something other than 0 and 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    runner = _model_and_runner_agree(model, torch.rand(batch, 1, 28, 28), training)
    assert runner.blocks, "no conv block ran on the kernels"


@needs_kernels
def test_batch_norm_with_cumulative_average_and_without_running_statistics():
    """And odd maps (29 -> 27 -> pooled to 13: the floor's last row and column get no gradient
    through the pool, but do through the batch statistics)."""
    for norm, act, pool in ((nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.MaxPool2d(2)),
                            (nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh(), nn.AvgPool2d(2)),
                            (nn.BatchNorm2d(4, affine=False), nn.Sigmoid(), nn.MaxPool2d(3))):
        torch.manual_seed(0)
        size = 27 // pool.kernel_size
        model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), norm, act, pool, nn.Flatten(),
                              nn.Linear(4 * size * size, 3))
        for _ in range(2):  # the second step checks the running averages' update from non-initial values
            _model_and_runner_agree(model, torch.rand(21, 1, 29, 29), True)
            model.zero_grad()


@needs_kernels
@pytest.mark.parametrize("window", [1, 4])
def test_batch_norm_before_a_pool_the_kernels_do_not_fuse(window):
    """BatchNorm's kernels pool over windows of 2 or 3; another window is left to PyTorch, after
    the BatchNorm block, and the model still equals PyTorch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(window),
                          nn.Flatten(), nn.Linear(4 * (24 // window) ** 2, 3))
    runner = _model_and_runner_agree(model, torch.rand(19, 1, 28, 28), True)
    assert isinstance(runner.rest[0], nn.MaxPool2d)


@needs_kernels
def test_lenet5_s_input_scaling_is_folded_into_c1_where_the_conv_allows():
    """LeNet-5's LeCunInput (pad 2, then -0.1 / 1.175) becomes C1's padding, weight and bias: no
    layer of its own runs on the kernels. Before a padded conv (whose zero padding would have to
    come after the scaling) it is not folded, runs as a layer, and the model still equals PyTorch."""
    from lenet.models.lenet5 import LeCunInput

    torch.manual_seed(0)
    runner, why = blconv.batch_last(create_model("lenet5"))
    assert runner is not None, why
    assert runner.stages[0].affine == (2, LeCunInput.high - LeCunInput.low, LeCunInput.low)
    assert runner.first_pad == 2
    model = nn.Sequential(LeCunInput(), nn.Conv2d(1, 4, 5, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 15 * 15, 3))
    runner = _model_and_runner_agree(model, torch.rand(9, 1, 28, 28), True)
    assert type(runner.stages[0]).__name__ == "_Layer" and runner.stages[1].affine is None


@needs_kernels
def test_lenet5_s_subsampling_runs_inside_the_conv_blocks():
    """S2 and S4 (sum x coefficient + bias, then the squashing) run in C1's and C3's own calls."""
    model = create_model("lenet5")
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    c1, c3 = runner.stages[:2]
    assert (c1.conv, c1.sub[0], c3.conv, c3.sub[0]) == (model.c1, model.s2, model.c3, model.s4)
    assert c1.sub[1] == c3.sub[1] == blconv.constants().activations[ScaledTanh]


@needs_kernels
@pytest.mark.parametrize("cin,size,batch", [(1, 28, 7), (6, 13, 16), (6, 14, 37)])
def test_a_block_with_subsampling_equals_the_block_then_the_affine_block(cin, size, batch):
    """The fused scale and shift give exactly what a ConvBlock followed by an AffineBlock gives:
    output and every gradient (a first layer, recomputed in the backward; one that keeps its
    activation; a map whose last row and column no pooling window covers; padded lanes)."""
    c = blconv.constants()
    st = c.activations[ScaledTanh]
    torch.manual_seed(cin + size)
    x = blconv.pad_cols(torch.randn(cin, size, size, -batch % 16 + batch), 0).requires_grad_(cin > 1)
    w = (torch.randn(5, cin, 5, 5) * 0.3).requires_grad_()
    b = (torch.randn(5) * 0.1).requires_grad_()
    s = (torch.rand(5) + 0.5).requires_grad_()
    t = (torch.randn(5) * 0.1).requires_grad_()
    keep = blconv.keeps_activation(w)
    split = blconv.AffineBlock.apply(blconv.ConvBlock.apply(x, w, b, 0, st, c.pool_avg, 2, keep), s * 4.0, t, st,
                                     c.pool_none, 1)
    g = torch.randn_like(split)
    leaves = [v for v in (x, w, b, s, t) if v.requires_grad]
    want = torch.autograd.grad(split, leaves, g)
    # the window's area multiplied in by PyTorch, or by the kernels (scale_by: LeNet-5's sum)
    for fused in (blconv.ConvBlock.apply(x, w, b, 0, st, c.pool_avg, 2, keep, s * 4.0, t, st),
                  blconv.ConvBlock.apply(x, w, b, 0, st, c.pool_avg, 2, keep, s, t, st, None, 4.0)):
        assert torch.equal(fused, split)
        for a, ref in zip(torch.autograd.grad(fused, leaves, g), want):
            assert torch.equal(a, ref)


@needs_kernels
def test_c3_output_maps_read_only_their_table_s_inputs():
    """C3 runs as a full 6 -> 16 convolution of the scattered weight: a map outside an output's
    table must not reach it, and the unconnected kernels (zeros) get no parameter to train."""
    from lenet.models.lenet5 import C3_TABLE, PartialConv2d

    torch.manual_seed(0)
    c3 = PartialConv2d(6, C3_TABLE, 5)
    nn.init.uniform_(c3.weight, -1, 1)
    nn.init.zeros_(c3.bias)
    model = nn.Sequential(c3, nn.AvgPool2d(2))  # no squashing: every change of the input shows
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    x = torch.randn(16, 6, 14, 14)
    base = runner(x)
    for i in range(6):
        bumped = x.clone()
        bumped[:, i] += 1.0
        changed = (runner(bumped) - base).abs().amax(dim=(0, 2, 3)) > 0
        assert changed.tolist() == [i in inputs for inputs in C3_TABLE], f"input map {i}"
    assert c3.weight.shape[0] == sum(len(t) for t in C3_TABLE) == 60


def _c3_mask() -> torch.Tensor:
    from lenet.models.lenet5 import C3_TABLE, PartialConv2d

    return PartialConv2d(6, C3_TABLE, 5).connections()


@needs_kernels
@pytest.mark.parametrize("mask_of,cin,cout,k,pad,size,act,pool,sub,batch", [
    (lambda: _c3_mask(), 6, 16, 5, 0, 14, "scaled_tanh", "avg", True, 37),  # LeNet-5's C3 with S4
    (lambda: _c3_mask(), 6, 16, 5, 0, 14, "scaled_tanh", "avg", False, 16),
    (lambda: torch.rand(6, 4) < 0.5, 4, 6, 3, 1, 11, "relu", "max", False, 21),  # 6 outputs, padded, odd map
    (lambda: torch.eye(8, 5) * torch.tensor([1, 0, 1, 1, 1]), 5, 8, 5, 2, 12, "sigmoid", "none", False, 7),  # unread maps
], ids=["c3+s4", "c3", "random", "unread maps"])
def test_a_masked_block_equals_the_dense_block_of_its_zero_filled_weight(mask_of, cin, cout, k, pad, size, act, pool,
                                                                          sub, batch):
    """With a connection mask the kernels skip the unconnected kernels, whose weights are zero: the
    output and the gradients of the input, bias, subsampling and every connected weight are those
    of the same block without the mask, bit for bit, and the unconnected weights' gradient is zero
    (what the dense block computes for them is discarded by PartialConv2d)."""
    c = blconv.constants()
    torch.manual_seed(cin * cout + k)
    mask = mask_of().to(torch.uint8).contiguous()
    lanes = -batch % 16 + batch
    x = blconv.pad_cols(torch.randn(cin, size, size, lanes), pad).requires_grad_()
    w = (torch.randn(cout, cin, k, k) * 0.3 * mask[:, :, None, None]).requires_grad_()
    b = (torch.randn(cout) * 0.1).requires_grad_()
    extra = [(torch.rand(cout) + 0.5).requires_grad_(), (torch.randn(cout) * 0.1).requires_grad_()] if sub else []
    st = c.activations[ScaledTanh]
    code, pool_code = act_of(act)[0], pool_of(pool)[0]
    window = 1 if pool == "none" else 2

    def block(m):
        args = (extra[0] * 4.0, extra[1], st) if sub else (None, None, 0)
        return blconv.ConvBlock.apply(x, w, b, pad, code, pool_code, window, blconv.keeps_activation(w), *args, m)

    masked, dense = block(mask), block(None)
    assert torch.equal(masked, dense)
    g = torch.randn_like(masked)
    leaves = [x, w, b, *extra]
    got, want = torch.autograd.grad(masked, leaves, g), torch.autograd.grad(dense, leaves, g)
    connected = mask.bool()[:, :, None, None].expand_as(w)
    for i, (a, ref) in enumerate(zip(got, want)):
        if i == 1:  # the weight: equal where connected, zero elsewhere
            assert torch.equal(a[connected], ref[connected]) and not a[~connected].any()
        else:
            assert torch.equal(a, ref), f"gradient {i}"


@needs_kernels
def test_lenet5_s_c3_runs_with_its_connection_mask():
    model = create_model("lenet5")
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    c3 = runner.stages[1]
    assert c3.conv is model.c3 and torch.equal(c3.mask, _c3_mask()) and int(c3.mask.sum()) == 60


@needs_kernels
def test_max_pool_ties_go_to_the_first_maximum_like_pytorch():
    x = torch.zeros(16, 1, 6, 6, requires_grad=True)  # ReLU of a zero conv: every window is a 4-way tie
    w = torch.zeros(2, 1, 3, 3, requires_grad=True)
    b = torch.tensor([0.0, 1.0], requires_grad=True)
    want = F.max_pool2d(torch.relu(F.conv2d(x, w, b, padding=1)), 2)
    want.sum().backward()
    want_b = b.grad.clone()
    b.grad = None
    for keep in (False, True):
        b.grad = None
        got = blconv.ConvBlock.apply(blconv.pad_cols(_to_bl(x.detach()), 1), w, b, 1, act_of("relu")[0],
                                     pool_of("max")[0], 2, keep)
        got.sum().backward()
        torch.testing.assert_close(b.grad, want_b)  # 9 windows x 16 examples for channel 1, not 4x that


@needs_kernels
def test_unsupported_shapes_are_refused_not_miscomputed():
    c = blconv.constants()
    x = torch.randn(1, 8, 8, c.lanes)
    with pytest.raises(RuntimeError, match="unsupported"):
        blconv.ConvBlock.apply(x, torch.randn(2, 1, 2, 2), None, 0, 0, c.pool_none, 1)  # 2x2: not compiled in
    with pytest.raises(RuntimeError, match="unsupported"):  # a batch that is not a multiple of the lanes
        blconv.ConvBlock.apply(torch.randn(1, 8, 8, c.lanes + 2), torch.randn(2, 1, 3, 3), None, 0, 0, c.pool_none, 1)


@needs_kernels
@pytest.mark.parametrize("overrides", [
    {},                                                   # the textbook LeNet
    {"pool": "max", "activation": "relu"},
    {"kernel_size": (3,), "padding": (1, 0)},
    {"channels": (6, 16, 32), "padding": (2, 2, 2)},      # 3 stages, a 7x7 map pooled to 3x3 (floor)
    {"activation": "tanh", "dense": ()},
    {"activation": "relu", "pool": "none", "channels": (4, 4)},
    {"activation": "relu", "dense": (32,)},
    {"dropout": 0.5},  # the dense kernels stop at the dropout; PyTorch runs it and what follows
])
@pytest.mark.parametrize("batch", [7, 96])  # not multiples of 16: padded inside, dropped after
def test_batch_last_model_equals_the_model(overrides, batch):
    torch.manual_seed(0)
    model = create_model("classic", **overrides)
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    x = torch.rand(batch, 1, 28, 28)
    torch.manual_seed(1)
    want = model(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    got = runner(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)
    assert list(runner.parameters()) == []  # the model owns the parameters; nothing is copied


@needs_kernels
def test_uint8_batches_go_straight_in():
    """The engine hands the runner uint8 (N, H, W) batches; the scaling by 1/255 happens inside."""
    torch.manual_seed(0)
    model = create_model("classic", activation="relu", pool="max")  # outputs that follow their input
    runner, _ = blconv.batch_last(model)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    scaled = images.unsqueeze(1).float() / 255.0
    torch.testing.assert_close(runner(images), runner(scaled), rtol=0, atol=1e-6)
    torch.testing.assert_close(runner(images), model(scaled), rtol=1e-5, atol=1e-6)
    relu = blconv.constants().activations[torch.nn.ReLU]
    assert runner.dense and [d[1] for d in runner.dense] == [relu, relu, 0]  # fc1, fc2 relu; out plain


@needs_kernels
@pytest.mark.parametrize("batch", [1, 17, 96, 256])
@pytest.mark.parametrize("pad", [0, 2])
def test_images_are_laid_out_as_pytorch_scales_and_pads_them(batch, pad):
    """The kernels' one-pass layout of uint8 images equals x.float() / 255 permuted to [1, H, W + 2
    pad, B] with zero columns and zero lanes, bit for bit (odd batches leave lanes to fill)."""
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    want = F.pad(images.permute(1, 2, 0).unsqueeze(0).float() / 255.0, (0, -batch % blconv.constants().lanes, pad, pad))
    got = blconv.images(images, pad)
    assert got.shape == want.shape and torch.equal(got, want)
    half = images[::2]  # any strides
    want_half = F.pad(half.permute(1, 2, 0).unsqueeze(0).float() / 255.0, (0, -half.shape[0] % blconv.constants().lanes, pad, pad))
    assert torch.equal(blconv.images(half, pad), want_half)


@needs_kernels
@pytest.mark.parametrize("batch", [1, 17, 256])
@pytest.mark.parametrize("classes,sign", [(10, -1.0), (10, 1.0), (13, -1.0)])
def test_the_rbf_block_and_its_gradient_equal_pytorch(batch, classes, sign):
    """LeNet-5's output units (and the Negate folded in with sign -1) against squared_distances
    and autograd, with odd batches (padded lanes) and extra units beyond the 10 digit bitmaps."""
    from lenet.models.lenet5 import digit_prototypes, squared_distances
    torch.manual_seed(0)
    protos = digit_prototypes(classes)
    x = (torch.randn(batch, 84).tanh() * 1.7159).requires_grad_()
    want = sign * squared_distances(x, protos)
    g = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, x, g)
    lanes = -batch % blconv.constants().lanes
    h = F.pad(x.detach().t(), (0, lanes)).requires_grad_()
    got = blconv.RBFBlock.apply(h, protos, sign)
    got.backward(F.pad(g.t(), (0, lanes)))
    torch.testing.assert_close(got[:, :batch].t(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad[:, :batch].t(), want_grad, rtol=1e-5, atol=1e-5)
    assert not h.grad[:, batch:].any()  # padded lanes get no gradient


def _rbf_head(*tail):
    from lenet.models.lenet5 import EuclideanRBF, digit_prototypes
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 12 * 12, 84),
                         ScaledTanh(), EuclideanRBF(digit_prototypes(13)), *tail)


@needs_kernels
@pytest.mark.parametrize("tail,sign,rest", [
    ((), 1.0, []),                                         # an RBF output alone: the penalties
    (("negate",), -1.0, []),                               # LeNet-5's scores
    (("negate", "linear"), -1.0, []),                      # a linear layer after it chains from its 13 units
    (("dropout", "negate"), None, ["Dropout", "EuclideanRBF", "Negate"]),  # not an RBF stage: the layers run as usual
])
def test_an_rbf_output_is_planned_with_what_follows_it(tail, sign, rest):
    from lenet.models.lenet5 import Negate
    made = {"negate": Negate, "linear": lambda: nn.Linear(13, 3), "dropout": lambda: nn.Dropout(0.0)}
    model = _rbf_head(*(made[t]() for t in tail))
    if tail[:1] == ("dropout",):  # the dropout before the RBF: move it there
        layers = list(model)
        model = nn.Sequential(*layers[:6], layers[7], layers[6], *layers[8:])
    torch.manual_seed(0)
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    rbfs = [st for st in runner.stages if isinstance(st, blconv._RBF)]
    assert [st.sign for st in rbfs] == ([sign] if sign is not None else [])
    assert [type(m).__name__ for m in runner.rest] == rest
    model.eval()
    _model_and_runner_agree(model, torch.rand(19, 1, 28, 28), training=False)


@needs_kernels
def test_images_refuse_what_is_not_a_uint8_batch():
    with pytest.raises(RuntimeError, match="images"):
        blconv.images(torch.rand(4, 28, 28), 0)
    with pytest.raises(RuntimeError, match="images"):
        blconv.images(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), 0)


@needs_kernels
def test_lenet5_s_output_runs_on_the_kernels_as_its_last_stage():
    runner, _ = blconv.batch_last(create_model("lenet5"))
    assert isinstance(runner.stages[-1], blconv._RBF) and runner.stages[-1].sign == -1.0 and runner.rest == []


@needs_kernels
@pytest.mark.parametrize("batch,classes,j", [(256, 10, 1.0), (37, 10, 1.0), (5, 13, 0.5), (1, 20, -2.0)])
def test_lenet5_s_loss_in_one_call_equals_pytorch_s(batch, classes, j):
    """The paper's loss (PaperLoss) against LeNet5.criterion's PyTorch version: the mean and the
    gradient, for penalties near and far from the rubbish class's constant, more classes than 16
    lanes' worth of one vector, and single examples."""
    model = create_model("lenet5", num_classes=classes, j=j)
    torch.manual_seed(0)
    scores = -(torch.rand(batch, classes) * torch.tensor([0.5, 200.0]).repeat_interleave(batch // 2 + 1)[:batch, None])
    labels = torch.randint(0, classes, (batch,))
    want_s, got_s = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    want = model.criterion(want_s, labels)
    got = blconv.PaperLoss.apply(got_s, labels, j)
    (want * 3).backward()
    (got * 3).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_s.grad, want_s.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(IndexError, match="not a class"):
        blconv.PaperLoss.apply(scores, torch.full((batch,), classes), j)


@needs_kernels
def test_the_training_step_takes_lenet5_s_loss_from_the_kernels_and_only_that_loss():
    lenet5, classic = create_model("lenet5"), create_model("classic")
    fast = blconv.fast_loss(lenet5.criterion)
    assert fast is not lenet5.criterion
    assert blconv.fast_loss(F.cross_entropy) is F.cross_entropy
    scores, labels = -torch.rand(8, 10) * 50, torch.randint(0, 10, (8,))
    torch.testing.assert_close(fast(scores, labels), lenet5.criterion(scores, labels))  # the kernel's
    torch.testing.assert_close(fast(scores.double(), labels), lenet5.criterion(scores.double(), labels))  # PyTorch's
    for model, want_kernel_loss in ((lenet5, True), (classic, False)):
        crit = getattr(model, "criterion", F.cross_entropy)
        step = engine.TrainStep(model, crit, torch.optim.SGD(model.parameters(), lr=0.01),
                                torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.01), lambda e: 1.0),
                                torch.device("cpu"), engine.EngineOptions(fast_conv=True))
        assert (step.criterion is not crit) == want_kernel_loss
    off = engine.TrainStep(lenet5, lenet5.criterion, torch.optim.SGD(lenet5.parameters(), lr=0.01),
                           torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(lenet5.parameters(), lr=0.01), lambda e: 1.0),
                           torch.device("cpu"), engine.EngineOptions(fast_conv=False, compile=False))
    assert off.criterion == lenet5.criterion  # PyTorch's convolutions: PyTorch's loss


@needs_kernels
def test_models_the_kernels_do_not_cover_are_left_alone():
    for name, overrides in [("classic", {"pool": "conv"}), ("classic", {"norm": "layer"}),
                            ("classic", {"activation": "gelu"}), ("modern", {"pool": "conv"})]:
        runner, why = blconv.batch_last(create_model(name, **overrides))
        assert runner is None and why, name
    notes = []
    step_model = create_model("classic", norm="layer")
    runner, conv = engine.conv_runner(step_model, torch.device("cpu"), engine.EngineOptions(fast_conv=True),
                                      notes.append)
    assert runner is step_model and conv == engine.PYTORCH_CONV
    assert notes and "--fast-conv not used" in notes[0]


def test_fast_conv_by_default_on_the_cpu_and_never_with_no_fast_conv():
    model = create_model("classic")
    cpu = torch.device("cpu")
    off = engine.conv_runner(model, cpu, engine.EngineOptions(fast_conv=False), print)
    assert off == (model, engine.PYTORCH_CONV)
    if blconv._compiler() is None:  # no kernels here: the default is PyTorch's convolutions
        assert engine.conv_runner(model, cpu, engine.EngineOptions(), print) == (model, engine.PYTORCH_CONV)
    else:
        require_kernels()
        runner, conv = engine.conv_runner(model, cpu, engine.EngineOptions(), print)
        assert isinstance(runner, blconv.BatchLast) and conv == engine.BATCH_LAST_CONV
        step = engine.TrainStep(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1),
                                                                  lambda s: 1.0),
                                cpu, engine.EngineOptions(compile=True))
        assert step.conv == engine.BATCH_LAST_CONV and not step.compiling  # the kernels' step runs eagerly


def test_no_compiler_or_switched_off_means_pytorch_convs(monkeypatch):
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv, "_lib", None)
    monkeypatch.setattr(blconv, "_problem", None)  # restored afterwards, like _lib and _loaded
    monkeypatch.setenv("LENET_NO_FAST_CONV", "1")
    assert blconv.library() is None and "LENET_NO_FAST_CONV" in blconv.problem()
    monkeypatch.delenv("LENET_NO_FAST_CONV")
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv.shutil, "which", lambda name: None)
    assert blconv.library() is None and "no C++ compiler" in blconv.problem()
    runner, why = blconv.batch_last(create_model("classic"))
    assert runner is None and "C++ compiler" in why
    monkeypatch.setattr(blconv, "_loaded", False)  # the next user builds/loads again


def test_a_failing_build_is_reported_and_skipped(monkeypatch, tmp_path):
    require_compiler()
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv, "_lib", None)
    monkeypatch.setattr(blconv, "_problem", None)  # restored afterwards, like _lib and _loaded
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(blconv, "SOURCE", bad)
    assert blconv.library() is None
    assert "building the batch-last kernels failed" in blconv.problem()
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind
    monkeypatch.setattr(blconv, "_loaded", False)


@needs_kernels
@pytest.mark.parametrize("overrides,lr", [({}, 0.9), ({"activation": "relu", "pool": "max"}, 0.1)])
def test_training_with_kernels_learns_like_pytorch_convs(fashion, overrides, lr):
    """Same initial weights, same seed, 8 steps on 2,000 real images: the kernels change speed, not
    learning. The weights are compared (losses barely move on the sigmoid's plateau): they agree to
    1e-6 (measured: at most 7e-8), while every parameter moved by more than 1e-3 and a 0.4% error
    (uint8 images scaled by 1/256 instead of 1/255) already differs by 8e-6."""
    import copy

    data = fashion.head(2000, 500)
    torch.manual_seed(0)
    init = create_model("classic", **overrides)
    cfg = dict(epochs=1, lr=lr, seed=0, compile=False, overrides=overrides)
    notes = []
    fast = train(TrainConfig(**cfg), data=data, model=copy.deepcopy(init), log=notes.append)
    assert fast.engine == "eager, " + engine.BATCH_LAST_CONV, notes
    ref = train(TrainConfig(**cfg, fast_conv=False), data=data, model=copy.deepcopy(init))
    assert ref.engine == "eager, " + engine.PYTORCH_CONV
    start, a, b = init.state_dict(), fast.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys() == start.keys()
    for name in a:
        moved = (b[name] - start[name]).abs().max().item()
        assert moved > 1e-3, f"{name} moved only {moved:.2g}: too little to compare"
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for h, r in zip(fast.history, ref.history, strict=True):
        assert h.train_loss == pytest.approx(r.train_loss, abs=1e-6)
        assert h.train_acc == pytest.approx(r.train_acc, abs=2 / 2000)  # a near tie may flip one image
        assert h.test_acc == pytest.approx(r.test_acc, abs=2 / 500)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("name", ["modern", "lenet5", "record-fashion"])
def test_the_family_learns_on_the_kernels_as_on_pytorch_convs(fashion, name):
    """Each preset's own recipe (Adam, one-cycle momentum, BatchNorm, mirror images, test-time
    flips), 8 steps of its batch on real images, same initial weights: every weight and running
    statistic within 2e-4 + 2e-3 of its tensor's scale, the same loss to 1e-5 and the same test
    accuracy. Measured: `lenet5`'s weights agree to 9e-8; the BatchNorm nets' drift apart by
    rounding as float32 PyTorch drifts from float64 (max pooling's near-ties route a gradient
    elsewhere): `modern` 3e-5, record-fashion's conv1 weight 2.2e-4 (Zen 5) to 2.5e-4 (Xeon) of
    0.30, while each parameter moved by more than 1e-3. The drift grows with the steps: after 16
    (2,000 images at batch 128) record-fashion's conv1 weight differed by 1.3e-3 of 0.45 on a Zen 5."""
    import copy

    batch = TrainConfig.for_model(name).batch_size
    data = fashion.head(8 * batch, 500)
    torch.manual_seed(0)
    init = create_model(name)
    runs = [train(TrainConfig.for_model(name, epochs=1, seed=0, compile=False, fast_conv=fast), data=data,
                  model=copy.deepcopy(init)) for fast in (None, False)]
    assert [r.engine for r in runs] == ["eager, " + engine.BATCH_LAST_CONV, "eager, " + engine.PYTORCH_CONV]
    got, want, start = runs[0].model.state_dict(), runs[1].model.state_dict(), init.state_dict()
    for key in want:
        if not want[key].is_floating_point() or key.endswith("prototypes"):
            continue
        assert (want[key] - start[key]).abs().max() > 1e-3, f"{key} did not move: nothing to compare"
        err, scale = (got[key] - want[key]).abs().max().item(), want[key].abs().max().item()
        assert err <= 2e-4 + 2e-3 * scale, f"{key} differs by {err:.3g} (scale {scale:.3g})"
    assert runs[0].final.train_loss == pytest.approx(runs[1].final.train_loss, abs=1e-5)
    assert runs[0].test_acc == runs[1].test_acc


@needs_kernels
def test_self_test_passes_on_this_machine():
    assert blconv._self_test() is None


@needs_kernels
def test_models_pytorch_would_refuse_are_refused_not_miscomputed():
    from torch import nn

    unchained = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.Conv2d(4, 16, 5), nn.ReLU(), nn.Flatten(),
                              nn.Linear(6400, 10))
    runner, why = blconv.batch_last(unchained)
    assert runner is None and "do not chain" in why
    wrong_features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.Flatten(), nn.Linear(100, 10))
    runner, _ = blconv.batch_last(wrong_features)
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        runner(torch.rand(4, 1, 28, 28))
    with pytest.raises(TypeError, match="float32 or uint8"):
        blconv.batch_last(create_model("classic"))[0](torch.rand(4, 1, 28, 28, dtype=torch.float64))


@needs_kernels
@pytest.mark.parametrize("overrides", [{}, {"activation": "relu", "pool": "max"}, {"activation": "tanh"}])
def test_nan_propagates_like_pytorch(overrides):
    """A NaN must reach the loss (training stops on it), not be squashed to a number by an activation."""
    model = create_model("classic", **overrides)
    runner, _ = blconv.batch_last(model)
    x = torch.rand(3, 1, 28, 28)
    x[1, 0, 14, 14] = float("nan")
    got, want = runner(x), model(x)
    assert torch.isnan(want[1]).all() and torch.isnan(got[1]).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("act", ["tanh", "scaled_tanh"])
def test_the_kernels_tanh_is_accurate_to_float_rounding(act):
    """The kernels compute tanh as a rational function (speed-notes.md section 20): on a dense
    grid over the whole range where it is not +-1, and on tiny arguments, it is within 6e-7 of
    tanh in float64 and, below 1, within 1e-6 of it relative (a few float32 roundings)."""
    grid = torch.linspace(-9, 9, 16001, dtype=torch.float64)
    tiny = torch.logspace(-30, -1, 399, dtype=torch.float64)
    z = torch.cat([grid, tiny, -tiny])
    n = len(z) - len(z) % 16
    x = z[:n].float().view(1, 1, n // 16, 16)  # [C, H, W, B]: a 1 x 1 conv by 1 of 16 lanes
    w, b = torch.ones(1, 1, 1, 1), torch.zeros(1)
    code, _ = act_of(act)
    got = blconv.ConvBlock.apply(x, w, b, 0, code, blconv.constants().pool_none, 1, False).reshape(-1).double()
    arg = x.reshape(-1).double()  # the float32 arguments the kernels saw
    want = 1.7159 * torch.tanh(arg * (2.0 / 3.0)) if act == "scaled_tanh" else torch.tanh(arg)
    err = (got - want).abs()
    assert err.max() < 6e-7, (arg[err.argmax()], err.max())
    small = want.abs() < 1
    assert (err[small] / want[small].abs().clamp_min(1e-38)).max() < 1e-6


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


@needs_kernels
@pytest.mark.parametrize("act", ["sigmoid", "tanh", "scaled_tanh"])
def test_saturated_activations_equal_pytorch_without_subnormal_numbers(act):
    """Pre-activations up to +-1e4 (a diverging run) reach the activation's limits as PyTorch's do,
    with no subnormal float in the output or in any gradient (this CPU family computes with them
    slowly; the exp inside the activations is clamped where its results stay normal). A 1x1
    convolution by 1 hands the kernels these pre-activations exactly."""
    z = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-120, 120, 2401)])
    x = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(3))][:4400].view(16, 1, 275, 1)
    w, b = torch.ones(1, 1, 1, 1, requires_grad=True), torch.zeros(1, requires_grad=True)
    act_code, act_fn = act_of(act)
    xb = _to_bl(x).requires_grad_()
    got = blconv.ConvBlock.apply(xb, w, b, 0, act_code, blconv.constants().pool_none, 1, False)
    torch.testing.assert_close(_from_bl(got.detach()), act_fn(x), rtol=1e-6, atol=1e-6)
    got.backward(torch.ones_like(got))
    assert [_subnormals(t) for t in (got, xb.grad, w.grad, b.grad)] == [0, 0, 0, 0]


def test_kernels_that_fail_their_check_are_not_used(monkeypatch):
    require_compiler()
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv, "_lib", None)
    monkeypatch.setattr(blconv, "_problem", None)  # restored afterwards, like _lib and _loaded

    def broken():
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(blconv, "_self_test", broken)
    assert blconv.library() is None
    assert "give wrong results" in blconv.problem() and "kernel crashed" in blconv.problem()
    monkeypatch.setattr(blconv, "_loaded", False)


@needs_kernels
def test_amp_flag_on_the_cpu_does_not_turn_the_kernels_off():
    model = create_model("classic")
    runner, conv = engine.conv_runner(model, torch.device("cpu"), engine.EngineOptions(amp="bf16"), print)
    assert conv == engine.BATCH_LAST_CONV


def _exercise_variants():
    from lenet.experiments.compare import load_spec

    from .conftest import REPO

    return [(v.name, v.model, v.overrides) for v in load_spec(REPO / "experiments" / "exercises.toml").variants]


@needs_kernels
@pytest.mark.parametrize("name,preset,overrides", _exercise_variants())
def test_every_exercise_variant_runs_on_the_kernels_and_equals_pytorch(name, preset, overrides):
    """`lenet compare experiments/exercises.toml` trains each of these through the kernels."""
    torch.manual_seed(0)
    model = create_model(preset, **overrides)
    runner, why = blconv.batch_last(model)
    assert runner is not None, f"{name}: {why}"
    x = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8)
    want = model(x.unsqueeze(1).float() / 255.0)
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = runner(x)
    got.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
