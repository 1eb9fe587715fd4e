"""CompileWatch: Triton's compile hooks, timed, counted, and warned about after start-up."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from triton import knobs
from triton.runtime.jit import JitFunctionInfo

from pdserve.kernels.compile_watch import CompileWatch


@pytest.fixture
def hooks():
    """Triton's two hooks, restored after the test."""
    rt = knobs.runtime
    saved = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    yield rt
    rt.jit_cache_hook, rt.jit_post_compile_hook = saved


def _compile(rt, name: str, key: str, constants: dict) -> bool | None:
    """What ``JITFunction._do_compile`` does around a compile: the before-hook (a true result
    skips the compile), then the after-hook, with the keywords Triton passes."""
    fn = JitFunctionInfo("kernels.fake", name, types.SimpleNamespace(arg_names=["x", "BLOCK"]))
    kw = dict(repr=name, fn=fn, compile={"key": key, "constants": constants})
    kw |= dict(is_manual_warmup=False, already_compiled=False)
    if rt.jit_cache_hook(key=key, **kw):
        return True
    rt.jit_post_compile_hook(key=key, **kw)
    return None


def test_start_up_compiles_are_counted_and_later_ones_warned_with_their_constexprs(hooks, caplog):
    watch = CompileWatch()
    watch.install()
    watch.install()  # once: a second install must not chain the watch to itself
    assert hooks.jit_cache_hook == watch._before
    _compile(hooks, "_moe_kernel", "k1", {(1,): 64})
    with caplog.at_level(logging.INFO, logger="pdserve.kernels.compile_watch"):
        watch.serving()
        _compile(hooks, "_moe_kernel", "k2", {(1,): 128})
    assert watch.totals()["start-up"][0] == 1 and watch.totals()["serving"][0] == 1
    first, later = watch.recent()
    assert not first.serving and later.serving and later.constants == "BLOCK=128"
    assert later.kernel == "kernels.fake._moe_kernel" and later.seconds >= 0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "_moe_kernel while serving" in warned[0].getMessage()
    assert "BLOCK=128" in warned[0].getMessage()
    assert any("1 kernel variants at start-up" in r.getMessage() for r in caplog.records)


def test_hooks_set_before_are_kept_and_may_still_skip_a_compile(hooks):
    seen = []
    hooks.jit_cache_hook = lambda **kw: seen.append(("before", kw["key"])) or kw["key"] == "skip"
    hooks.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["key"]))
    watch = CompileWatch()
    watch.install()
    assert _compile(hooks, "_k", "a", {}) is None
    assert _compile(hooks, "_k", "skip", {}) is True  # the earlier hook's answer stands
    assert seen == [("before", "a"), ("after", "a"), ("before", "skip")]
    assert watch.totals()["start-up"][0] == 1  # a skipped compile is not one


@pytest.mark.gpu
def test_a_real_compile_on_the_gpu_is_recorded(hooks):
    import triton
    import triton.language as tl

    @triton.jit
    def _fill_kernel(out_ptr, value, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.full((BLOCK,), value, tl.float32))

    watch = CompileWatch()
    watch.install()
    watch.serving()
    out = torch.empty(32, device="cuda")
    _fill_kernel[(1,)](out, 2.0, BLOCK=32)
    _fill_kernel[(1,)](out, 3.0, BLOCK=32)  # the same variant: no second compile
    torch.cuda.synchronize()
    assert out.eq(3.0).all()
    (done,) = [c for c in watch.recent() if c.kernel.endswith("_fill_kernel")]
    assert done.serving and "BLOCK=32" in done.constants and done.seconds > 0
