"""``beside``: both branches' results, in order on the CPU and eagerly; side by side on two
streams in a captured CUDA graph, whose replay gives the eager results."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.model.side_stream import beside


def test_eager_calls_run_the_side_branch_then_the_main_one():
    order = []
    x = torch.arange(4.0)

    def side():
        order.append("side")
        return x * 2

    def main():
        order.append("main")
        return x + 1

    a, b = beside(side, main, like=x)
    assert order == ["side", "main"]
    assert torch.equal(a, x * 2) and torch.equal(b, x + 1)


@pytest.mark.gpu
def test_a_captured_graph_runs_the_side_branch_on_its_own_stream():
    x = torch.randn(64, 256, device="cuda")
    w1, w2 = torch.randn(256, 512, device="cuda"), torch.randn(256, 128, device="cuda")
    streams = []

    def side():
        streams.append(torch.cuda.current_stream())
        return torch.relu(x @ w1).sum(1)  # several kernels on the side stream

    def main():
        streams.append(torch.cuda.current_stream())
        return torch.tanh(x @ w2).sum(1)

    def step():
        a, b = beside(side, main, like=x)
        return a + b  # after the join

    want = step()
    assert streams[0] == streams[1]  # eager: one stream
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    assert streams[2] != streams[3]  # captured: the side branch on its own stream
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step(), rtol=1e-5, atol=1e-4)
    assert not torch.equal(out, want)  # the replay read the new input
