"""CUDA: same numbers as CPU float64, no host synchronisation inside step(). Runs only with a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import metalr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAKERS = {
    "AdamHD-tensor": lambda p, **kw: metalr.AdamHD(p, lr=1e-2, **kw),
    "AdamWHD-element": lambda p, **kw: metalr.AdamWHD(p, lr=1e-2, granularity="element", **kw),
    "SGDHD-nesterov-group": lambda p, **kw: metalr.SGDHD(
        p, lr=1e-2, momentum=0.9, nesterov=True, granularity="group", **kw
    ),
    "HyperLR-Adam": lambda p, **kw: metalr.HyperLR(torch.optim.Adam(p, lr=1e-2, **kw)),
}


def _run(model, optimizer, x, y, steps=20):
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_matches_cpu_float64(name, foreach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    model = model.double()
    gpu_model = copy.deepcopy(model).cuda()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    kw = {} if name.startswith("HyperLR") else {"foreach": foreach}
    cpu_opt, gpu_opt = (
        MAKERS[name](model.parameters(), **kw),
        MAKERS[name](gpu_model.parameters(), **kw),
    )
    _run(model, cpu_opt, x, y)
    _run(gpu_model, gpu_opt, x.cuda(), y.cuda())
    for p, q in zip(model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-12)
    cpu_eff, gpu_eff = cpu_opt.effective_lrs(), gpu_opt.effective_lrs()
    for p, q in zip(model.parameters(), gpu_model.parameters()):
        assert gpu_eff[q].device.type == "cuda"
        torch.testing.assert_close(gpu_eff[q].cpu(), cpu_eff[p], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["AdamHD-tensor", "AdamWHD-element", "SGDHD-nesterov-group"])
def test_cuda_step_never_synchronises_with_the_host(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    opt = MAKERS[name](model.parameters(), foreach=True)
    x = torch.randn(8, 16, device="cuda")
    for i in range(3):  # the first step creates state; later steps must stay on the device
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if i > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_cuda_fused_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    eager_model = copy.deepcopy(model)
    fused = metalr.AdamHD(model.parameters(), lr=1e-2, fused=True)
    eager = metalr.AdamHD(eager_model.parameters(), lr=1e-2)
    x = torch.randn(8, 16, device="cuda")
    for m, o in ((model, fused), (eager_model, eager)):
        _run(m, o, x, torch.zeros(8, 4, device="cuda"))
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["triton-lagged", "triton-exact", "default"])
@pytest.mark.parametrize("name", ["AdamHD-tensor", "SGDHD-nesterov-group"])
def test_cuda_triton_kernels_match_eager_without_host_sync(name, mode):
    """fused=True on CUDA runs metalr's Triton kernels: same numbers as the eager path in the
    same mode, a NaN gradient handled alike, and no host synchronisation after the first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    model = model.cuda()
    eager_model = copy.deepcopy(model)
    opt = MAKERS[name](model.parameters(), **MODES[mode][0])
    eager = MAKERS[name](eager_model.parameters(), **MODES[mode][1])
    x = torch.randn(32, 16, device="cuda")
    for i in range(6):
        for m, o in ((model, opt), (eager_model, eager)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            if i == 3:
                next(m.parameters()).grad[0, 0] = float("nan")
            if i > 1 and o is opt:
                torch.cuda.set_sync_debug_mode("error")
            try:
                o.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    eff, eager_eff = opt.effective_lrs(), eager.effective_lrs()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(eff[p], eager_eff[q], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["AdamHD-tensor", "AdamWHD-element", "HyperLR-Adam"])
def test_cpu_checkpoint_loads_onto_cuda(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = MAKERS[name](model.parameters())
    _run(model, opt, torch.randn(8, 6), torch.randn(8, 3), steps=3)
    gpu_model = copy.deepcopy(model).cuda()
    gpu_opt = MAKERS[name](gpu_model.parameters())
    gpu_opt.load_state_dict(opt.state_dict())
    for p in gpu_model.parameters():
        rate = gpu_opt.state[p]["lr_multiplier"]
        assert rate.device.type == "cuda" and rate.dtype == torch.float32
    _run(gpu_model, gpu_opt, torch.randn(8, 6).cuda(), torch.randn(8, 3).cuda(), steps=2)
    assert all(torch.isfinite(p).all() for p in gpu_model.parameters())


#: (optimizer options, options of the eager run it must equal): the foreach path, the
#: Triton kernels of fused=True (one launch lagged, two exact), and the default (fused=None:
#: the exact kernels on CUDA where they apply, else the foreach path).
MODES = {
    "foreach": ({"foreach": True}, {"foreach": True}),
    "default": ({}, {"foreach": True}),
    "triton-lagged": ({"fused": True, "lagged": True}, {"foreach": True, "lagged": True}),
    "triton-exact": ({"fused": True}, {"foreach": True}),
}
CAPTURE_CASES = [
    (name, mode)
    for name in ("AdamHD-tensor", "AdamWHD-element", "SGDHD-nesterov-group")
    for mode in MODES
    if mode in ("foreach", "default") or "element" not in name
]


@pytest.mark.parametrize(("name", "mode"), CAPTURE_CASES)
def test_whole_training_step_captures_in_a_cuda_graph(name, mode):
    """No host sync and no host-to-device copy inside step(): forward, backward and step capture
    into one CUDA graph (torch's whole-network recipe) and replays equal eager training."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2)
    ).cuda()
    eager_model = copy.deepcopy(model)
    opt = MAKERS[name](model.parameters(), **MODES[mode][0])
    eager_opt = MAKERS[name](eager_model.parameters(), **MODES[mode][1])
    data = [
        (torch.randn(16, 6, device="cuda"), torch.randn(16, 2, device="cuda")) for _ in range(8)
    ]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step(m, o, x, y):
        ((m(x) - y) ** 2).mean().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up creates the lazy state outside the capture
        for x, y in data[:3]:
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        eager_opt.zero_grad(set_to_none=True)
        train_step(eager_model, eager_opt, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        train_step(eager_model, eager_opt, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    eff, eager_eff = opt.effective_lrs(), eager_opt.effective_lrs()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(eff[p], eager_eff[q], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["triton-lagged", "triton-exact"])
def test_triton_step_bookkeeping_is_one_compiled_graph_under_a_scheduler(mode):
    """On CUDA the seek rule's bookkeeping after the Triton pass is one compiled graph (one
    kernel instead of ~100 launches), built once and kept while a scheduler changes lr."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    model = model.cuda()
    opt = MAKERS["AdamHD-tensor"](model.parameters(), **MODES[mode][0])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
    x, y = torch.randn(16, 8, device="cuda"), torch.randn(16, 2, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    for _ in range(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == 1


def test_default_step_on_cuda_runs_the_triton_kernels_on_one_state_buffer():
    """fused=None on CUDA takes the Triton kernels (the eager path costs ~20 launches per
    tensor) and keeps the seek rule's state as rows of one buffer per kind."""
    from metalr.functional import _fused

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    model = model.cuda()
    opt = metalr.AdamWHD(model.parameters(), lr=1e-2)
    _run(model, opt, torch.randn(16, 8, device="cuda"), torch.randn(16, 2, device="cuda"), 3)
    assert _fused._AUTO["ran"] and not _fused._AUTO["failed"]
    for key in ("lr_multiplier", "hd_controller", "step"):
        storages = {opt.state[p][key].untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) == 1, key


def test_workbench_study_on_cuda_matches_cpu(tmp_path):
    """``metalr ablate device=cuda``: data, model and optimizer on the GPU; the records say so and
    the losses match the CPU run's."""
    from metalr.workbench import resolve_study, run_study

    def study(device):
        return resolve_study({"name": "t", "tasks": ["digits_mlp"], "steps": 30, "log_every": 10,
                              "lrs": [0.01], "seeds": [0], "device": device,
                              "optimizers": {"adam": {"kind": "adam"},
                                             "adam_hd": {"kind": "adam_hd"}},
                              "out": str(tmp_path / device)})  # fmt: skip

    gpu = {r["optimizer"]: r for r in run_study(study("cuda"), quiet=True)}
    cpu = {r["optimizer"]: r for r in run_study(study("cpu"), quiet=True)}
    for name in ("adam", "adam_hd"):
        assert gpu[name]["provenance"]["device"].startswith("cuda")
        assert gpu[name]["final_val_loss"] == pytest.approx(cpu[name]["final_val_loss"], rel=1e-3)
    assert gpu["adam_hd"]["final_lr"]["mean"] != pytest.approx(0.01)
