"""mla_decode, FlashInfer fa3: the host plan's layout (CPU), and the planned kernel against
mla_decode_torch eagerly and replayed from a CUDA graph after a new plan (SM90 GPU with
FlashInfer and nvcc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.kernels.mla_decode_flashinfer import FlashInferMLADecode, csr, unavailable
from pdserve.kernels.mla_reference import mla_decode_torch
from tests.kernels.kernel_cases import rel_err
from tests.kernels.test_mla_decode import paged

PAGE, D, V = 64, 576, 512  # DeepSeek's latent rows, the widths FlashInfer's kernels take


def test_csr_takes_each_rows_blocks_up_to_its_length():
    tables = [[5, 9], [1, 2, 3], [7, 8, 9, 10]]
    lens = [1, 65, 192]
    qo, indptr, indices, kv_lens = csr(lens, tables, 64)
    assert qo.tolist() == [0, 1, 2, 3] and kv_lens.tolist() == lens
    assert indptr.tolist() == [0, 1, 3, 6]
    assert indices.tolist() == [5, 1, 2, 7, 8, 9]
    padded = np.array([[5, 9, 0, 0], [1, 2, 3, 0], [7, 8, 9, 10]], dtype=np.int32)
    from_padded = csr(lens, padded, 64)
    assert all(np.array_equal(a, b) for a, b in zip(from_padded, (qo, indptr, indices, kv_lens)))
    assert all(a.dtype == np.int32 for a in (*from_padded, qo, indptr, indices, kv_lens))


def test_other_latent_widths_run_the_triton_kernel(device):
    """The test models' 64 + 16 latent: the backend's call is the Triton kernel's (on CPU
    under the interpreter), and a plan is then ignored."""
    if device.type == "cpu":
        pytest.importorskip("triton")
    cache, table, lens = paged([5, 20], 16, 80, torch.float32, device)
    q = torch.randn(2, 4, 80, device=device)
    fi = FlashInferMLADecode()
    assert fi.runs == "flashinfer_fa3"
    out = fi(q, cache, table, lens, 0.1, 64)
    assert fi.runs == "triton"  # what status reports from then on
    fi.plan([5, 20], table.tolist(), 16)
    assert rel_err(out, mla_decode_torch(q, cache, table, lens, 0.1, 64)) < 1e-5


def test_a_graphs_plan_layout_may_not_move():
    """A decode graph's later plans must put FlashInfer's arrays where its capture's did: the
    same layout passes, a moved one is an error naming the way out, a wrapper that keeps no
    layout where this version of FlashInfer does goes unchecked."""
    from types import SimpleNamespace

    fi = FlashInferMLADecode()
    fi._check_layout(8, SimpleNamespace(_plan_info=[2, 66, 0, 65536]))
    fi._check_layout(8, SimpleNamespace(_plan_info=(2, 66, 0, 65536)))
    fi._check_layout(16, SimpleNamespace(_plan_info=[1, 132, 0, 65536]))  # its own batch
    with pytest.raises(RuntimeError, match="of 8 decode rows moved its arrays.*cuda_graphs: false"):
        fi._check_layout(8, SimpleNamespace(_plan_info=[2, 66, 64, 65536]))
    fi._check_layout(8, SimpleNamespace())


def _gpu_or_skip(device):
    if device.type != "cuda" or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("FlashInfer's MLA fa3 kernels are built for sm_90a")
    if reason := unavailable():
        pytest.skip(reason)


@pytest.mark.parametrize("heads", [16, 128])
def test_planned_kernel_matches_reference(device, heads):
    _gpu_or_skip(device)
    fi = FlashInferMLADecode(few_rows=False)  # FlashInfer's kernel at every row count
    for seed, lens in enumerate(([1], [7, 64, 65, 1000], [4096] * 3 + [129] * 30)):
        cache, table, seq_lens = paged(lens, PAGE, D, torch.bfloat16, device, seed=seed)
        q = torch.randn(len(lens), heads, D, device=device).bfloat16()
        fi.plan(lens, table.tolist(), PAGE)
        out = fi(q, cache, table, seq_lens, D**-0.5, V)
        ref = mla_decode_torch(q, cache, table, seq_lens, D**-0.5, V)
        assert rel_err(out, ref) < 1e-2, lens


def test_graph_replays_the_new_plans_lengths(device):
    """Captured once for batch 8, replayed after plans of other lengths and tables: each
    replay gives the reference's output for the lengths planned last."""
    _gpu_or_skip(device)
    b, heads = 8, 16
    cache, table, seq_lens = paged([3000] * b, PAGE, D, torch.bfloat16, device, seed=1)
    q = torch.randn(b, heads, D, device=device).bfloat16()
    lens_buf, table_buf = seq_lens.clone(), table.clone()
    host = table.cpu().numpy()
    fi = FlashInferMLADecode(few_rows=False)
    fi.plan([1] * b, host, PAGE, graph_batch=b)
    lens_buf.fill_(1)
    fi(q, cache, table_buf, lens_buf, D**-0.5, V)  # first call: the plan waits for the shape
    torch.cuda.synchronize()
    fi.plan([1] * b, host, PAGE, graph_batch=b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fi(q, cache, table_buf, lens_buf, D**-0.5, V)
    for lens in ([3000] * b, [1, 5, 64, 65, 700, 3000, 2, 1999]):
        lens_buf.copy_(torch.tensor(lens, dtype=torch.int32))
        fi.plan(lens, host, PAGE, graph_batch=b)
        graph.replay()
        ref = mla_decode_torch(q, cache, table_buf, lens_buf, D**-0.5, V)
        assert rel_err(out, ref) < 1e-2, lens


def test_steps_of_few_rows_run_the_triton_kernel(device, monkeypatch):
    """Up to ``TRITON_ROWS`` decode rows (2 here, at up to 16 heads) the backend runs the Triton
    kernel and plans nothing on FlashInfer's wrappers; from 3 rows (on an SM90 GPU) FlashInfer's
    kernel runs under its plan. Each gives the reference's output. The first call builds
    FlashInfer's module with a plan of 3 rows, whatever the step's rows; a graph batch keeps
    the kernel it was first planned with."""
    from pdserve.kernels import mla_decode_flashinfer

    monkeypatch.setattr(mla_decode_flashinfer, "TRITON_ROWS", {16: 2, 64: 1})
    assert [mla_decode_flashinfer.triton_rows(h) for h in (8, 16, 32, 128)] == [2, 2, 1, 0]
    if device.type == "cpu":
        pytest.importorskip("triton")
    fi = FlashInferMLADecode()
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    flashinfer = sm90 and unavailable() is None  # else the Triton kernel's rows alone
    built, build = [], fi._build
    monkeypatch.setattr(fi, "_build", lambda rows: (built.append(rows), flashinfer and build(rows)))
    for lens in ([5, 70], [1], *([[3, 64, 65]] if flashinfer else [])):
        cache, table, seq_lens = paged(lens, PAGE, D, torch.float32, device, seed=len(lens))
        cache, q = cache.to(torch.bfloat16), torch.randn(len(lens), 16, D, device=device)
        q = q.bfloat16()
        fi.plan(lens, table.tolist(), PAGE, graph_batch=len(lens))
        out = fi(q, cache, table, seq_lens, D**-0.5, V)
        assert set(fi._wrappers) - {None} == ({3} if len(lens) > 2 else set())
        assert fi.runs == "flashinfer_fa3" and built == [3]
        ref = mla_decode_torch(q, cache, table, seq_lens, D**-0.5, V)
        assert rel_err(out, ref) < 1e-2, lens
    monkeypatch.setattr(mla_decode_flashinfer, "TRITON_ROWS", {16: 0})
    with pytest.raises(AssertionError, match="the graphs of 2 decode rows changed kernel"):
        fi.plan([5, 70], [[0, 1], [2, 3]], PAGE, graph_batch=2)
