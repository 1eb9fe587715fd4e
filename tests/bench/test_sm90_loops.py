"""The sm_90 loop report: its parsers on known text, a compile of the MLA decode for sm_90 on
this machine (no GPU) whose shared memory the tiles' model predicts, and bad arguments refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

from pdserve.bench import sm90_loops
from pdserve.kernels.triton_configs import mla_decode_smem

TTGIR = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x32x512xbf16, #shared, #smem, mutable>
    %b = ttg.local_alloc %q : (tensor<16x512xbf16>) -> !ttg.memdesc<16x512xbf16, #shared, #smem>
    %c = ttg.local_alloc : () -> !ttg.memdesc<1x32x64xbf16, #shared, #smem, mutable>
    %w0 = ttg.async_wait %t {num = 5 : i32}
    %r = scf.for %i = %lo to %hi step %c32 iter_args() -> () : i32 {
      %w1 = ttg.async_wait %x, %y {num = 4 : i32}
    }
    %w2 = ttg.async_wait {num = 0 : i32}
"""

SASS = """
        /*0100*/                   IMAD R1, R2, R3, RZ ;
        /*0110*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0120*/                   LDS.128 R8, [R2] ;
        /*0130*/              @P0 BRA 0x110 ;
        /*0140*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0150*/              @P1 BRA 0x100 ;
        /*0160*/                   EXIT ;
"""


def test_parsers():
    assert sm90_loops.loop_buffers(TTGIR) == [3, 1]
    assert sm90_loops.loop_waits(TTGIR) == [4, 0]  # from the loop on
    n, ops = sm90_loops.sass_loop(SASS)  # the innermost loop with an MMA: 0x110..0x130
    assert n == 3 and ops == {"HMMA": 1, "LDS": 1, "BRA": 1}
    assert sm90_loops.sass_loop(SASS.replace("HMMA", "FFMA")) == (0, {})


def _compiled(tmp_path, kernel: str, *tiles: tuple[int, ...]) -> list[dict]:
    """The rows ``python -m pdserve.bench.sm90_loops KERNEL TILES --json`` writes, compiled (not
    interpreted): in a process without TRITON_INTERPRET."""
    out = tmp_path / "rows.json"
    cli = [sys.executable, "-P", "-m", "pdserve.bench.sm90_loops", kernel]
    cli += [",".join(map(str, t)) for t in tiles] + ["--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(cli, check=True, env=env, capture_output=True)
    result = json.loads(out.read_text())
    assert result["target"] == "sm_90" and result["triton"] == triton.__version__, result
    return result["rows"]


def test_mla_decode_compiles_for_sm90_as_its_shared_memory_model_says(tmp_path):
    """The 3-stage tiles hold two KV buffers and their loop's wait leaves copies in flight (each
    tile's pages read the tile before: the KV loads overlap the products), in the shared memory
    the tiles' model predicts."""
    (row,) = _compiled(tmp_path, "mla_decode", (16, 32, 4, 3))
    out = json.dumps(row)
    tiles = dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=3)
    assert abs(row["smem"] - mla_decode_smem(tiles, 576)) <= 4096, out
    assert row["buffers"][0] >= 2 and row["waits"][0] >= 1 and row["waits"][-1] == 0, out


def test_moe_tiles_loaded_ahead_compile_for_sm90_without_weight_buffers(tmp_path):
    """The MoE down projection's K loop pipelined by Triton rotates its tiles through buffers in
    shared memory; with AHEAD (``moe_k_loops``) it holds none, only the activations' tile."""
    piped, ahead = _compiled(tmp_path, "moe_gemm2", (64, 64, 4, 4), (64, 64, 4, 1, 1))
    out = [piped, ahead]
    assert len(piped["buffers"]) == 3 and piped["waits"][0] >= 1, out  # activations, codes, scales
    assert ahead["buffers"] == [] and ahead["waits"] == [], out
    assert ahead["smem"] == 64 * 16 * 2, out  # the [BLOCK_M, BLOCK_K] bf16 activations alone


def test_bad_tiles_are_refused(capsys):
    for tiles in ("16,32,4", "16,32,x,2", "16,32,4,2,1"):
        with pytest.raises(SystemExit):
            sm90_loops.main(["mla_decode", tiles])
        assert "four comma-separated numbers each" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sm90_loops.main(["moe_gemm2", "64,64,4"])
    assert "four to six comma-separated numbers each" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sm90_loops.main(["moe_gemm2", "64,64,4,1,3"])
    assert "AHEAD (the fifth number) is 0, 1 or 2" in capsys.readouterr().err
