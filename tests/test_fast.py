"""The fast step (fused SGD with a device-tensor lr, CUDA graph with self-check and eager fallback).

No GPU here: the graph is stood in for by a replay that runs the same step on the static buffers,
so everything around the capture (warm-up steps leaving no trace, lr changes reaching the replay,
the self-check, the fallback) is exercised on the CPU.
"""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_lab.fast as fast
from resnet_lab.data import normalize
from resnet_lab.fast import Stepper, make_optimizer
from resnet_lab.models import build_model

LRS = [0.1, 0.1, 0.01, 0.01, 0.001]


def batches(n=len(LRS), b=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def reference(model, data):
    """The textbook loop: float lr set per step, plain (for-loop) SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    losses = []
    for (x, y), lr in zip(data, LRS):
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(normalize(x))
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


def with_stepper(model, data, fast_flag=True):
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    st = Stepper(model, opt, lr_t, precision="fp32", fast=fast_flag)
    losses = [float(st(x, y, lr)[0]) for (x, y), lr in zip(data, LRS)]
    return st, losses


def pair():
    torch.manual_seed(0)
    a = build_model("resnet", 8)
    b = build_model("resnet", 8)
    b.load_state_dict(a.state_dict())
    return a, b


def assert_same_training(a, b, la, lb):
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    for u, v in zip(a.buffers(), b.buffers()):  # BN running statistics and batch counts
        assert torch.allclose(u.float(), v.float(), atol=1e-5)


def test_on_cpu_the_eager_fallback_is_taken_and_learns_what_the_reference_learns():
    a, b = pair()
    data = batches()
    st, la = with_stepper(a, data)
    assert st.mode == "eager" and "CUDA device" in st.reason
    assert_same_training(a, b, la, reference(b, data))
    st_off, _ = with_stepper(build_model("resnet", 8), data[:1], fast_flag=False)
    assert st_off.mode == "eager" and st_off.reason == "fast=False"


def test_to_device_lays_every_conv_out_channels_last_on_the_cpu_and_learns_the_same():
    """channels_last on the CPU too (faster evaluation, one layout everywhere): the layout, not what is learned."""
    a, b = pair()
    a = fast.to_device(a, torch.device("cpu"))
    convs = [p for p in a.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs)
    data = batches()
    _, la = with_stepper(a, data)
    assert_same_training(a, b, la, reference(b, data))  # b stays in the default layout
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in a.parameters() if p.dim() == 4)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay runs the step on the captured static buffers."""

    def __init__(self, st, lr_scale=1.0):
        self.st, self.lr_scale = st, lr_scale

    def replay(self):
        st = self.st
        for g in st.opt.param_groups:
            g["lr"] = st.lr_t * self.lr_scale  # lr_scale != 1: a graph with a wrong (stale) lr baked in
        st.opt.zero_grad(set_to_none=True)
        st._loss, st._wrong = st._body(st._x, st._y, cache=False)  # the stepper's step: fp16's scale included
        for g in st.opt.param_groups:
            g["lr"] = st.lr_t


def fake_capture(lr_scale=1.0, fail=False):
    def capture(self, x, y):
        self._x, self._y = x.clone(), y.clone()
        for _ in range(fast.WARMUP_STEPS):  # as the real capture: eager steps that change the state
            self.opt.zero_grad(set_to_none=True)
            self._body(self._x, self._y)
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self._graph, self._grads = FakeGraph(self, lr_scale), [p.grad for p in self._params()]
    return capture


@pytest.fixture
def graphs_available(monkeypatch):
    monkeypatch.setattr(fast, "graph_unavailable", lambda device: None)


def test_graph_path_leaves_no_trace_of_capture_and_follows_the_lr_schedule(graphs_available, monkeypatch):
    monkeypatch.setattr(Stepper, "_capture", fake_capture())
    a, b = pair()
    data = batches()
    st, la = with_stepper(a, data)
    assert st.mode == "graph" and st.reason is None
    assert st.check["loss_rel_diff"] < 1e-6 and st.check["update_rel_diff"] < 1e-5
    assert_same_training(a, b, la, reference(b, data))


def test_failed_capture_falls_back_to_eager_and_restores_the_state(graphs_available, monkeypatch):
    monkeypatch.setattr(Stepper, "_capture", fake_capture(fail=True))
    a, b = pair()
    data = batches()
    st, la = with_stepper(a, data)
    assert st.mode == "eager" and "stream is capturing" in st.reason
    assert_same_training(a, b, la, reference(b, data))


def test_a_capture_that_raises_keeps_every_later_step_in_the_process_eager(graphs_available, monkeypatch):
    """The real `_capture`, its CUDA calls stood in for on the CPU, with a capture that raises inside
    `torch.cuda.graph`: the run falls back to eager, frees the graph's tensors, and from then on
    `graph_unavailable` refuses CUDA graphs for the process (torch 2.11's allocator may not recover)."""

    class Stream:
        def wait_stream(self, other):
            pass

    class BrokenGraph:
        def __init__(self, g, stream=None):
            assert isinstance(stream, Stream)  # captured on the stepper's own stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast, "_capture_failed", None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", BrokenGraph)
    a, b = pair()
    data = batches()
    st, la = with_stepper(a, data)
    assert st.mode == "eager" and "stream is capturing" in st.reason
    assert st._graph is None and st._grads is None and st._x is None and st._side is None
    assert_same_training(a, b, la, reference(b, data))
    failed = fast._capture_failed
    monkeypatch.undo()  # the real graph_unavailable and torch.cuda again (and the flag reset) ...
    monkeypatch.setattr(fast, "_capture_failed", failed)  # ... but for the flag this capture set
    why = fast.graph_unavailable(torch.device("cuda"))
    assert why.startswith("an earlier CUDA graph capture in this process failed (RuntimeError: operation not")


def test_a_capture_broken_in_its_body_is_ended(monkeypatch):
    """Left capturing, the stream would fail every later allocation and random draw, the eager fallback's too."""
    ended = []

    class Graph:
        def capture_end(self):
            ended.append(True)

    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fast._end_broken_capture(Graph(), None)
    assert ended == []  # a capture that ended (or never began) is left alone
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fast._end_broken_capture(Graph(), None)
    assert ended == [True]


def test_self_check_rejects_a_graph_that_disagrees_with_the_eager_step(graphs_available, monkeypatch):
    monkeypatch.setattr(Stepper, "_capture", fake_capture(lr_scale=10.0))
    a, b = pair()
    data = batches()
    st, la = with_stepper(a, data)
    assert st.mode == "eager" and "disagrees" in st.reason and st.check["update_rel_diff"] > 1
    assert_same_training(a, b, la, reference(b, data))


def test_resumed_optimizer_keeps_following_the_schedule():
    """A loaded optimizer state brings its own lr tensor; the stepper must point it back at lr_t."""
    torch.manual_seed(0)
    m = build_model("resnet", 8)
    opt, lr_t = make_optimizer(m, 0.1, 0.9, 1e-4)
    x, y = batches(1)[0]
    Stepper(m, opt, lr_t, "fp32")(x, y, 0.1)
    opt2, lr2 = make_optimizer(m, 0.1, 0.9, 1e-4)
    opt2.load_state_dict(opt.state_dict())
    st = Stepper(m, opt2, lr2, "fp32")
    st(x, y, 0.05)
    assert opt2.param_groups[0]["lr"] is lr2 and float(lr2) == pytest.approx(0.05)


class Twin(torch.nn.Module):
    """A stand-in for a compiled module: the same net, called through another module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def compiled_stepper(model, data, twin=None, monkeypatch=None):
    if twin is not None:  # stand in for torch.compile
        monkeypatch.setattr(torch, "compile", twin)
    opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
    st = Stepper(model, opt, lr_t, precision="fp32", compile=True)
    return st, [float(st(x, y, lr)[0]) for (x, y), lr in zip(data, LRS)]


def test_a_compiled_forward_learns_what_the_reference_learns():
    """Inductor (its C++ backend here, Triton on a GPU) compiles the forward and the backward; the first step
    through it is checked against the plain one and the rest follow the reference loop."""
    a, b = pair()
    data = batches()
    st, la = compiled_stepper(a, data)
    assert st.compiled and st.label == "eager+compile" and st.compile_reason is None
    assert st.compile_check["loss_rel_diff"] < 1e-4 and st.compile_check["update_rel_diff"] < 1e-3
    assert 0 <= st.compile_check["bn_stats_rel_diff"] < 1e-3
    lb = reference(b, data)
    assert la == pytest.approx(lb, rel=1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-4)
    for u, v in zip(a.buffers(), b.buffers()):  # BN running statistics: updated by the compiled forward too
        assert torch.allclose(u.float(), v.float(), atol=1e-4)


def test_a_compile_that_fails_or_disagrees_leaves_the_plain_forward(monkeypatch):
    def broken(model, **kw):
        raise RuntimeError("no C++ compiler")

    class Doubled(torch.nn.Module):  # computes something else: the check must catch it
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return 2 * self.model(x)

    class StaleStats(Twin):  # learns the same, but leaves BatchNorm's running statistics where they were
        def forward(self, x):
            bns = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            saved = [m.momentum for m in bns]
            for m in bns:
                m.momentum = 0.0
            try:
                return self.model(x)
            finally:
                for m, v in zip(bns, saved):
                    m.momentum = v

    for twin, why in ((broken, "no C++ compiler"), (lambda model, **kw: Doubled(model), "compiled step disagrees"),
                      (lambda model, **kw: StaleStats(model), "'bn_stats_rel_diff'")):
        a, b = pair()
        data = batches()
        st, la = compiled_stepper(a, data, twin, monkeypatch)
        assert not st.compiled and st.label == "eager" and why in st.compile_reason
        assert_same_training(a, b, la, reference(b, data))  # the state the check stepped from, put back


def test_nets_past_dynamos_limit_are_said_not_compiled(monkeypatch):
    """Every residual block shares one forward, whose compiled versions dynamo caps (8 by default): a net
    past the cap would run uncompiled while claiming otherwise. A ResNet-8 of one width has 3 block shapes;
    here the cap is 6 and dynamo traces only."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(fast, "COMPILE_RECOMPILE_LIMIT", 6)
    # config.patch, not monkeypatch: monkeypatch's undo would delete the settings, hiding them from later tests
    limit, fail = fast.dynamo_limit_names(torch._dynamo.config)  # torch before 2.7 names them otherwise
    with torch._dynamo.config.patch(**{limit: 1, fail: False}):
        _past_the_limit()


def _past_the_limit() -> None:
    try:
        steppers = []
        for width in (1, 2, 3):  # three widths, three new block shapes each
            torch.manual_seed(0)
            m = build_model("resnet", 8, width=width)
            opt, lr_t = make_optimizer(m, 0.1, 0.9, 1e-4)
            st = Stepper(m, opt, lr_t, precision="fp32", compile=True)
            x, y = batches(1)[0]
            st(x, y, 0.1)
            steppers.append(st)
        assert [st.compiled for st in steppers] == [True, True, False]
        assert "limit" in steppers[-1].compile_reason
    finally:
        torch._dynamo.reset()


def test_a_capture_that_fails_through_the_compiled_forward_captures_the_plain_one(graphs_available, monkeypatch):
    """A recompile in the capture's warm-up (or a replay that disagrees) is the compile's fault: the graph,
    worth more, is kept with the plain forward, and the run says why it is not compiled."""
    plain_capture = fake_capture()

    def capture(self, x, y):
        if self.compiled:
            raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
        plain_capture(self, x, y)

    monkeypatch.setattr(Stepper, "_capture", capture)
    a, b = pair()
    data = batches()
    st, la = compiled_stepper(a, data, lambda model, **kw: Twin(model), monkeypatch)
    assert st.mode == "graph" and st.reason is None and st.label == "graph"
    assert not st.compiled and "recompile" in st.compile_reason and st.compile_reason.startswith("torch.compile dropped")
    assert_same_training(a, b, la, reference(b, data))


def test_an_fp16_graph_replays_its_loss_scale_and_checks_a_step_that_was_taken(graphs_available, monkeypatch):
    """fp16 through the graph path: the scale starts too high, so the first steps overflow and are skipped; the
    self-check goes again at half the scale until it compares a step taken (two skipped steps agree on
    nothing), and graph and eager then train alike, scale and skips included."""
    monkeypatch.setattr(Stepper, "_capture", fake_capture())
    monkeypatch.setattr(fast, "LOSS_SCALE_INIT", 2.0 ** 18)  # ResNet-8, batch 8: 2 skips, then it grows
    monkeypatch.setattr(fast, "LOSS_SCALE_GROWTH_INTERVAL", 2)
    a, b = pair()
    data = batches()  # batch 8: fp16 convolutions' backward is slow on some CPUs
    runs = {}
    for model, graph in ((a, True), (b, False)):
        opt, lr_t = make_optimizer(model, 0.1, 0.9, 1e-4)
        st = Stepper(model, opt, lr_t, precision="fp16", fast=graph)
        trail = [(float(st(x, y, lr)[0]), float(st.scaler.scale)) for (x, y), lr in zip(data, LRS)]
        runs[graph] = st, trail
    st, trail = runs[True]
    assert st.mode == "graph" and not st.check["skipped"] and st.check["loss_scale"] < 2.0 ** 18
    assert st.check["update_rel_diff"] < 1e-5
    assert trail == runs[False][1] and float(st.scaler.skipped) == float(runs[False][0].scaler.skipped) >= 1
    assert any(s2 == 2 * s1 for (_, s1), (_, s2) in zip(trail, trail[1:]))  # it grew again on a replay
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not hasattr(st.opt, "found_inf")  # no stale flag left on the optimizer for a later plain step


def test_the_compiled_twin_compiles_each_block_and_shares_the_weights(monkeypatch):
    """Blocks of one shape share one compiled graph (ResNet-56: 27 blocks, 5 shapes), so depth costs no
    compile time; the twin's parameters and buffers are the model's own, and the model is left plain."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        torch.manual_seed(0)
        m = build_model("resnet", 56)
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        twin = fast.compiled_twin(m)
        assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in twin.blocks)
        assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in m.blocks)
        assert [p.data_ptr() for p in twin.parameters()] == [p.data_ptr() for p in m.parameters()]
        assert [b.data_ptr() for b in twin.buffers()] == [b.data_ptr() for b in m.buffers()]
        x = torch.randn(4, 3, 32, 32)
        m.eval()
        out = twin(x)
        assert torch.allclose(out, m(x), atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 5
    finally:
        torch._dynamo.reset()


class _TF32Probe(nn.Module):
    """Records, at each forward and at its backward, whether cuDNN/cuBLAS may use TF32 for fp32 maths."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: list[tuple[str, bool, bool]] = []

    def flags(self, when: str) -> None:
        self.seen.append((when, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    def forward(self, x):
        self.flags("forward")
        out = x.float().mean((1, 2, 3)).view(-1, 1) * self.w
        if out.requires_grad:  # not under evaluate's no_grad
            out.register_hook(lambda g: self.flags("backward"))
        return torch.cat([out, torch.zeros(len(x), 9)], 1)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fp32_maths_is_fp32_not_tf32_in_evaluation_and_in_the_step(precision):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default on recent GPUs: the "fp32" evaluation
    and 08's fp32 reference loop would not be fp32 there. The flags are off inside and restored after."""
    from resnet_lab.fast import compute_dtype, step_body
    from resnet_lab.train import evaluate

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        m = _TF32Probe()
        x, y = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
        evaluate(m, [(x, y)], "fp32")
        assert m.seen == [("forward", False, False)]
        m.seen.clear()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        step_body(m, opt, x, y, precision)
        exact = compute_dtype(torch.device("cpu"), precision) == "fp32"
        assert m.seen == [("forward", not exact, not exact), ("backward", not exact, not exact)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_exact_fp32_works_where_the_process_uses_torchs_newer_precision_api():
    """Reading the legacy TF32 flags raises once conv and rnn were set apart through `fp32_precision`: then
    exact_fp32 sets that API instead, and restores it."""
    from resnet_lab.fast import exact_fp32

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API: the legacy flags are all there is")
    conv, rnn = torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    before = conv.fp32_precision, rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        conv.fp32_precision, rnn.fp32_precision = "tf32", "ieee"
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # noqa: B018 (the legacy read torch refuses here)
        with exact_fp32():
            assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32" and torch.backends.cuda.matmul.fp32_precision == before[2]
    finally:
        conv.fp32_precision, rnn.fp32_precision = before[:2]
    assert torch.backends.cudnn.allow_tf32 in (True, False)  # the legacy read works again
