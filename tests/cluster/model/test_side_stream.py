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


@pytest.mark.gpu
def test_graphs_sharing_a_pool_replay_layers_of_branches():
    """As the decode graphs are captured: several sizes, largest first, in one memory pool;
    each a stack of layers whose side branch's result, freed after the join, leaves its block
    to the next layer's side branch. Every replay gives its eager result, read before the
    next replay, as a decode step reads its graph's output (graphs of one pool may reuse the
    blocks of each other's outputs, so a replay out of capture order may overwrite them)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(256, 256, device="cuda", generator=g) / 16 for _ in range(4)]

    def layer(x, w):
        shared, y = beside(lambda: torch.relu(x @ w), lambda: torch.tanh(x @ w.T), like=x)
        return y + shared  # the side branch's block is free again after this

    def layers(x):
        for w in ws:
            x = layer(x, w)
        return x

    inputs = {n: torch.randn(n, 256, device="cuda", generator=g) for n in (64, 8, 1)}
    pool, graphs, outs = None, {}, {}
    for n, x in inputs.items():  # largest first, as DecodeGraphs.capture
        layers(x)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outs[n] = layers(x)
        pool, graphs[n] = graph.pool(), graph
    for x in inputs.values():
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
    for n in (1, 64, 8, 1):
        graphs[n].replay()
        torch.testing.assert_close(outs[n], layers(inputs[n]), rtol=1e-5, atol=1e-5)
