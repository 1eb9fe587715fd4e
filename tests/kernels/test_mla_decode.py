"""mla_decode, Triton: paged absorbed MLA against mla_decode_torch."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.mla_decode_triton import mla_decode_triton
from pdserve.kernels.mla_reference import mla_decode_torch
from tests.kernels.kernel_cases import nan_like, poison_cuda_allocator, rel_err

SMALL = dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)


def paged(lens, page, d, dtype, device, seed=0, extra_blocks=3):
    """A shuffled paged cache holding len(lens) sequences, and their block table."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // page) for n in lens]
    width = max(blocks) + 1  # one spare column: entries past a sequence's length are ignored
    num = sum(blocks) + extra_blocks
    cache = torch.randn(num, page, d, generator=gen).to(dtype).to(device)
    perm = torch.randperm(num, generator=gen)
    table = torch.full((len(lens), width), num + 99, dtype=torch.int32)  # junk past the length
    at = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[at : at + nb]
        at += nb
    return cache, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "dtype, heads, d, v_dim, page, lens",
    [
        (torch.float32, 3, 80, 64, 16, [1, 37, 100]),  # tiny model's 64 + 16, crossing pages
        (torch.bfloat16, 2, 80, 64, 16, [17, 16, 64]),
        (torch.float32, 4, 40, 24, 5, [7, 12, 1, 30]),  # odd page size, non-power-of-2 V
        (torch.bfloat16, 16, 48, 48, 8, [9, 33]),  # no rope part: V is the whole row
    ],
)
def test_matches_reference(device, num_splits, dtype, heads, d, v_dim, page, lens):
    cache, table, seq_lens = paged(lens, page, d, dtype, device, seed=heads)
    q = torch.randn(len(lens), heads, d).to(dtype).to(device)
    scale = d**-0.5
    out = mla_decode_triton(
        q, cache, table, seq_lens, scale, v_dim, num_splits=num_splits, config=SMALL,
        out=nan_like((len(lens), heads, v_dim), dtype, device),
    )  # fmt: skip
    ref = mla_decode_torch(q, cache, table, seq_lens, scale, v_dim)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_more_splits_than_tokens_and_empty_sequence(device):
    cache, table, seq_lens = paged([3, 0, 1], 4, 80, torch.float32, device)
    q = torch.randn(3, 2, 80, device=device)
    out = mla_decode_triton(q, cache, table, seq_lens, 0.1, 64, num_splits=8, config=SMALL)
    ref = mla_decode_torch(q, cache, table, seq_lens, 0.1, 64)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("num_splits", [17, 130])  # a combine of 128 rows, and past it
def test_combines_wider_than_the_split_count(device, num_splits):
    cache, table, seq_lens = paged([600, 37], 4, 80, torch.float32, device, seed=num_splits)
    q = torch.randn(2, 2, 80, device=device)
    out = mla_decode_triton(q, cache, table, seq_lens, 0.1, 64, num_splits=num_splits, config=SMALL)
    assert rel_err(out, mla_decode_torch(q, cache, table, seq_lens, 0.1, 64)) < 1e-5


def test_combine_takes_several_heads_per_program(device):
    """On the CPU's 4 "SMs", 3 sequences x 20 heads: 3 heads per combine program, every
    column (``combine_grid``), the last program of each sequence 2 heads; 1 x 6 heads: one head
    and 64 columns per program. A sequence of length 0 among them."""
    from pdserve.kernels.mla_decode_triton import combine_grid

    assert combine_grid(3, 20, 64, 4) == (3, 64) and combine_grid(1, 6, 64, 4) == (1, 64)
    assert combine_grid(1, 128, 512, 132) == (1, 64) and combine_grid(8, 128, 512, 132) == (1, 512)
    assert combine_grid(64, 128, 512, 132) == (15, 512)
    assert combine_grid(512, 128, 512, 132) == (16, 512)
    for b, heads, lens in ((3, 20, [300, 0, 45]), (1, 6, [300])):
        cache, table, seq_lens = paged(lens, 8, 80, torch.float32, device, seed=5)
        q = torch.randn(b, heads, 80, device=device)
        out = mla_decode_triton(q, cache, table, seq_lens, 0.2, 64, num_splits=5, config=SMALL)
        assert rel_err(out, mla_decode_torch(q, cache, table, seq_lens, 0.2, 64)) < 1e-5
        if b == 3:
            assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_heads_beyond_one_block_and_default_config(device):
    cache, table, seq_lens = paged([70, 5], 16, 80, torch.float32, device)
    q = torch.randn(2, 20, 80, device=device)  # 20 heads: two head blocks of 16
    ref = mla_decode_torch(q, cache, table, seq_lens, 0.3, 64)
    assert rel_err(mla_decode_triton(q, cache, table, seq_lens, 0.3, 64, config=SMALL), ref) < 1e-5
    assert rel_err(mla_decode_triton(q, cache, table, seq_lens, 0.3, 64), ref) < 1e-5


def test_splits_fill_one_wave_of_the_programs_an_sm_holds(monkeypatch):
    """``split_count`` with ``one_wave`` (the MLA decode's): (sequence, head block, split)
    programs for at most one wave of ``per_sm`` programs per SM (132 SMs), each split >= 2 KV
    tiles, at most 128 splits; without it (the GQA decode's), rounded up;
    ``programs_per_sm`` from the tiles' shared memory against the SM's (228 KiB), 2 where the
    device does not say (the interpreter)."""
    from pdserve.kernels import mla_decode_triton as m

    def one_wave(*shape, per_sm):
        return m.split_count(*shape, per_sm=per_sm, one_wave=True)

    # 16 heads (one head block), 128-token tiles, one resident per SM
    assert one_wave(64, 1, 4096, 128, 132, per_sm=1) == 2  # 128 programs, not 192
    assert one_wave(32, 1, 4096, 128, 132, per_sm=1) == 4
    assert one_wave(128, 1, 4096, 128, 132, per_sm=1) == 1
    assert one_wave(32, 1, 1024, 128, 132, per_sm=1) == 4  # 2 tiles a split at most
    # 128 heads in 64-head blocks: 4 sequences of 4k in one wave of 128 programs
    assert one_wave(4, 2, 4096, 64, 132, per_sm=1) == 16
    assert one_wave(4, 2, 4096, 64, 132, per_sm=2) == 32
    assert one_wave(5, 1, 1 << 20, 32, 132, per_sm=2) == 52  # 260 programs of 264 places
    # the GQA decode's count rounds up: 8 KV heads x 8 sequences, 5 splits
    assert m.split_count(5, 1, 1 << 20, 32, 132) == 53 and m.split_count(8, 8, 8192, 64, 132) == 5
    assert m.split_count(1, 1, 1 << 20, 32, 132) == 128 and m.split_count(999, 8, 64, 32, 132) == 1
    h100 = 228 * 1024
    monkeypatch.setattr(m, "smem_per_sm", lambda device: h100)
    cuda = torch.device("cuda")
    few = dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2)  # 56 KiB
    wide = dict(BLOCK_H=16, BLOCK_N=128, num_warps=8, num_stages=2)  # 164 KiB
    heads64 = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2)  # 218 KiB
    assert [m.programs_per_sm(c, 576, 2, cuda) for c in (few, wide, heads64)] == [2, 1, 1]
    assert m.programs_per_sm(heads64, 576, 4, cuda) == 1  # float32: more than an SM, still 1
    monkeypatch.setattr(m, "smem_per_sm", lambda device: 0)
    assert m.programs_per_sm(wide, 576, 2, cuda) == 2


def test_split_count_compiles_nothing_new():
    """The decode and combine kernels (MLA's and GQA's) take the split count, the block table's
    row stride and the strides that follow the split count at run time, not specialized: eager
    steps' split counts follow their block tables' width, step by step.
    Compiled (not interpreted) kernels hold their parameters, so this looks in a process
    without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    code = (
        "import pdserve.kernels.mla_decode_triton as m, pdserve.kernels.gqa_decode_triton as g\n"
        "for k in (m._decode_kernel, m._combine_kernel, g._decode_kernel, g._combine_kernel):\n"
        "    free = {p.name for p in k.params if p.do_not_specialize and not p.is_constexpr}\n"
        "    want = {'NUM_SPLITS', 'stride_lb', 'stride_lh'}\n"
        "    want |= {'stride_btb'} if 'stride_btb' in k.arg_names else set()\n"
        "    assert want <= free, (k, want - free)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-P", "-c", code], check=True, env=env)
    from pdserve.kernels.mla_decode_triton import combine_width

    assert {combine_width(n) for n in range(1, 129)} == {16, 128}


def test_tiles_follow_the_head_count_and_the_device():
    """On sm_90, 16 heads take the 16-head entry and more heads the largest, a named GPU's own
    entries before sm_90's; devices without an entry (SM120) take the default's, whose tiles fit
    99 KiB."""
    from pdserve.kernels.triton_configs import MLA_DECODE, mla_decode_config, mla_decode_smem

    h200 = ("NVIDIA H200", "sm90", "default")
    assert mla_decode_config(h200, 16) == MLA_DECODE["NVIDIA H200"][16]
    assert mla_decode_config(h200, 16) != MLA_DECODE["sm90"][16]
    hopper = ("NVIDIA H100 NVL", "sm90", "default")  # no entry of its own
    assert mla_decode_config(hopper, 16) == MLA_DECODE["sm90"][16]
    assert (
        mla_decode_config(hopper, 128)
        == mla_decode_config(hopper, 32)
        == MLA_DECODE["sm90"][1 << 30]
    )
    sm120 = ("sm120", "default")
    assert mla_decode_config(sm120, 16) == mla_decode_config(sm120, 128)
    assert mla_decode_config(("default",), 128) == MLA_DECODE["default"][1 << 30]
    assert all(mla_decode_smem(c, 576) <= 99 * 1024 for c in MLA_DECODE["default"].values())
    for key in set(MLA_DECODE) - {"default"}:
        assert all(mla_decode_smem(c, 576) <= 227 * 1024 for c in MLA_DECODE[key].values())


def test_bad_inputs(device):
    cache, table, seq_lens = paged([4], 4, 80, torch.float32, device)
    q = torch.randn(1, 2, 80, device=device)
    with pytest.raises(ValueError, match="v_dim 81"):
        mla_decode_triton(q, cache, table, seq_lens, 0.1, 81)
    with pytest.raises(ValueError, match="dtype"):
        mla_decode_triton(q.double(), cache, table, seq_lens, 0.1, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_deepseek_shapes_gpu(heads, num_splits):
    dev = torch.device("cuda")
    lens = [1, 63, 64, 65, 1000, 4097, 300, 2]
    cache, table, seq_lens = paged(lens, 64, 576, torch.bfloat16, dev, seed=heads)
    q = torch.randn(len(lens), heads, 576, device=dev).bfloat16()
    poison_cuda_allocator()
    out = mla_decode_triton(
        q, cache, table, seq_lens, 192**-0.5, 512, num_splits=num_splits,
        out=nan_like((len(lens), heads, 512), q.dtype, dev),
    )  # fmt: skip
    assert rel_err(out, mla_decode_torch(q, cache, table, seq_lens, 192**-0.5, 512)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tiles",
    [
        (16, 32, 4, 3),
        (16, 64, 8, 3),
        (16, 32, 4, 4),
        (16, 16, 4, 4),
        (64, 64, 8, 2),
        (32, 16, 8, 4),
    ],
)
def test_pipelined_tiles_gpu(tiles):
    """Tiles whose KV loads run one to three tiles ahead of the products (each tile's pages
    read the tile before): sequences ending inside a tile, a page, and one tile."""
    dev = torch.device("cuda")
    bh, bn, warps, stages = tiles
    lens = [1, 15, 16, 17, 63, 64, 65, 129, 1000, 4097]
    cache, table, seq_lens = paged(lens, 64, 576, torch.bfloat16, dev, seed=bn)
    q = torch.randn(len(lens), bh * 2, 576, device=dev).bfloat16()
    cfg = dict(BLOCK_H=bh, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    ref = mla_decode_torch(q, cache, table, seq_lens, 192**-0.5, 512)
    for splits in (1, 3):
        out = mla_decode_triton(
            q, cache, table, seq_lens, 192**-0.5, 512, num_splits=splits, config=cfg,
            out=nan_like((len(lens), bh * 2, 512), q.dtype, dev),
        )  # fmt: skip
        assert rel_err(out, ref) < 1e-2, (tiles, splits)


@pytest.mark.gpu
def test_combine_of_several_heads_per_program_gpu():
    """16 sequences x 128 heads: 3 heads and all 512 columns per combine program on a GPU of
    132 SMs (``combine_grid``), the last program of a sequence 2; lengths 0 to 3000."""
    from pdserve.kernels.device import sm_count
    from pdserve.kernels.mla_decode_triton import combine_grid

    dev = torch.device("cuda")
    lens = [0, 1, 64, 65, 3000, 700, 128, 5, 2047, 2048, 33, 1000, 1500, 9, 400, 2999]
    cache, table, seq_lens = paged(lens, 64, 576, torch.bfloat16, dev, seed=7)
    q = torch.randn(len(lens), 128, 576, device=dev).bfloat16()
    assert combine_grid(len(lens), 128, 512, sm_count(dev))[1] == 512
    poison_cuda_allocator()
    out = mla_decode_triton(
        q, cache, table, seq_lens, 192**-0.5, 512, num_splits=6,
        out=nan_like((len(lens), 128, 512), q.dtype, dev),
    )  # fmt: skip
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out, mla_decode_torch(q, cache, table, seq_lens, 192**-0.5, 512)) < 1e-2


@pytest.mark.gpu
def test_cuda_graph_replay_gpu():
    dev = torch.device("cuda")
    cache, table, seq_lens = paged([128, 2048, 128], 64, 576, torch.bfloat16, dev)  # capacity
    seq_lens.copy_(torch.tensor([100, 2000, 7], dtype=torch.int32))
    q = torch.randn(3, 16, 576, device=dev).bfloat16()
    mla_decode_triton(q, cache, table, seq_lens, 0.07, 512)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_triton(q, cache, table, seq_lens, 0.07, 512)
    for new_lens in ([101, 1999, 64], [1, 2048, 65]):  # lengths change, shapes do not
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        assert rel_err(out, mla_decode_torch(q, cache, table, seq_lens, 0.07, 512)) < 1e-2


@pytest.mark.gpu
def test_sm120_sized_configs_compile_and_run_on_hopper():
    """The ``default`` configs are the ones an SM120 GPU (99 KiB shared memory per block) gets:
    compile and run each at DeepSeek's shapes here, and check what the compiled kernels use."""
    import pdserve.kernels.mla_decode_triton as mla
    from pdserve.kernels.triton_configs import MLA_DECODE

    def compiled() -> dict[int, object]:
        caches = (*mla._decode_kernel.device_caches.values(),)
        return {id(k): k for cache in caches for k in cache[0].values()}

    dev = torch.device("cuda")
    before = compiled()
    for heads in (16, 128):
        lens = [1, 65, 1000, 4097]
        cache, table, seq_lens = paged(lens, 64, 576, torch.bfloat16, dev, seed=heads)
        q = torch.randn(len(lens), heads, 576, device=dev).bfloat16()
        ref = mla_decode_torch(q, cache, table, seq_lens, 192**-0.5, 512)
        for config in MLA_DECODE["default"].values():
            out = mla_decode_triton(q, cache, table, seq_lens, 192**-0.5, 512, config=config)
            assert rel_err(out, ref) < 1e-2, config
    new = [k for key, k in compiled().items() if key not in before]
    assert new, "the default configs compiled nothing new"
    assert max(k.metadata.shared for k in new) <= 99 * 1024, [k.metadata.shared for k in new]
