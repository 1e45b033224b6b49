"""subquad.ops.cuda_graph: graphs recorded through the driver, memory from torch's allocator."""

import pytest
import torch

from subquad.ops import cuda_graph

needs_driver_graphs = pytest.mark.skipif(
    not cuda_graph.driver_graphs_available(), reason="driver graphs need CUDA and libcuda"
)


@pytest.mark.parametrize(
    "switch, available, kind", [(True, True, "driver"), (False, True, "torch"), (True, False, "torch")]
)
def test_new_graph_is_the_drivers_when_switched_on_and_available(monkeypatch, switch, available, kind):
    class TorchGraph:  # stands in for torch.cuda.CUDAGraph, which a CPU build cannot make
        pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", TorchGraph)
    monkeypatch.setattr(cuda_graph, "DRIVER", switch)
    monkeypatch.setattr(cuda_graph, "driver_graphs_available", lambda: available)
    expected = cuda_graph.DriverGraph if kind == "driver" else TorchGraph
    assert type(cuda_graph.new_graph()) is expected


def test_misuse_is_reported_before_any_cuda_call():
    graph = cuda_graph.DriverGraph()
    with pytest.raises(ValueError, match="capture_error_mode='loose': expected one of \\['global'"):
        graph.capture_begin(capture_error_mode="loose")
    with pytest.raises(RuntimeError, match="capture_end\\(\\) without a capture_begin"):
        graph.capture_end()
    with pytest.raises(RuntimeError, match="replay\\(\\) before a successful capture_end"):
        graph.replay()
    with pytest.raises(RuntimeError, match="pool\\(\\) before"):
        graph.pool()


def _capture(step, pool=None):
    """``step()`` recorded on a side stream: (graph, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (cuBLAS handles, kernels) outside the capture
        graph = cuda_graph.DriverGraph()
        graph.capture_begin(pool=pool)
        out = step()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


@needs_driver_graphs
def test_replays_equal_eager_and_share_a_pool():
    # Temporaries allocated inside the capture come from its pool: replays after the eager tensors have
    # been freed and their memory refilled give the eager result again. A second graph shares the pool.
    x = torch.randn(37, 53, device="cuda")
    w = torch.randn(53, 29, device="cuda")

    def step():
        return torch.relu(x @ w).sum(0) * 0.5 + x[:, :29].mean(0)

    graph, out = _capture(step)
    other, out2 = _capture(lambda: (x * 3).sin().sum(), pool=graph.pool())
    assert other.pool() == graph.pool()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        junk = [torch.full((1 << n,), 1e4, device="cuda") for n in range(8, 20)]
        del junk
        graph.replay()
        other.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, step(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out2, (x * 3).sin().sum(), rtol=1e-5, atol=1e-4)


@needs_driver_graphs
def test_capture_errors_name_the_call():
    graph = cuda_graph.DriverGraph()
    with pytest.raises(RuntimeError, match="non-default stream"):
        graph.capture_begin()  # on the default stream
    x = torch.randn(8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = cuda_graph.DriverGraph()
        graph.capture_begin()
        try:
            with pytest.raises(RuntimeError, match="not in capture mode"):
                torch.rand(4, device="cuda")  # torch's generator knows only its own captures
            with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
                torch.cuda.synchronize()  # prohibited in "global" mode: it invalidates the capture
        finally:
            with pytest.raises(RuntimeError, match="cuStreamEndCapture failed"):
                graph.capture_end()
    torch.cuda.synchronize()
    assert torch.equal(x + 1, x + 1)  # the stream and the allocator work on
    with pytest.raises(RuntimeError, match="captured already"):
        graph.capture_begin()
