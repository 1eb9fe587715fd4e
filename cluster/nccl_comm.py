"""An NCCL communicator called directly (through ctypes), for collectives inside CUDA graphs.

torch.distributed's NCCL process group tracks every collective on a watchdog thread that polls
its CUDA events; a decode step captured into a CUDA graph with its all-reduces failed on two
H200s (``cudaErrorStreamCaptureInvalidated``). NCCL itself supports stream capture: this
communicator enqueues ``ncclAllReduce`` / ``ncclAllGather`` on the caller's current stream and
nothing else, so a graph captures the collective and replays it. It is made once per
tensor-parallel group, its unique id passed from rank 0 through the existing process group.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: 7, torch.float16: 6, torch.bfloat16: 9, torch.float64: 8, torch.int64: 4}
_SUM = 0


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def _library() -> ctypes.CDLL:
    """The libnccl torch loaded (by soname), else the one its nvidia wheel ships."""
    candidates = [os.environ.get("PDSERVE_NCCL_LIBRARY", ""), "libnccl.so.2"]
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        candidates += glob.glob(os.path.join(site, "nvidia", "nccl*", "lib", "libnccl.so*"))
    errors = []
    for path in filter(None, candidates):
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        return lib
    raise RuntimeError(f"no NCCL library found ({'; '.join(errors)})")


class NcclComm:
    """Rank ``rank`` of ``size`` on the current CUDA device."""

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup) -> None:
        self.rank, self.size = rank, size
        self._lib = _library()
        uid = _UniqueId()
        if rank == 0:
            self._check(self._lib.ncclGetUniqueId(ctypes.byref(uid)))
        box = [bytes(uid.internal) if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        ctypes.memmove(uid.internal, box[0], 128)
        self._comm = ctypes.c_void_p()
        self._check(
            self._lib.ncclCommInitRank(ctypes.byref(self._comm), size, uid, ctypes.c_int(rank))
        )
        log.info("NCCL communicator for CUDA graphs: rank %d of %d", rank, size)

    def _check(self, code: int) -> None:
        if code != 0:
            raise RuntimeError(f"NCCL error {code}: {self._lib.ncclGetErrorString(code).decode()}")

    def _stream(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place, on the current stream."""
        assert x.is_cuda and x.is_contiguous(), "NCCL all-reduce needs a contiguous CUDA tensor"
        ptr = ctypes.c_void_p(x.data_ptr())
        self._check(
            self._lib.ncclAllReduce(
                ptr,
                ptr,
                ctypes.c_size_t(x.numel()),
                _DTYPES[x.dtype],
                _SUM,
                self._comm,
                self._stream(),
            )  # fmt: skip
        )
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, ...] on every rank -> [size * n, ...], rank order, on the current stream."""
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._check(
            self._lib.ncclAllGather(
                ctypes.c_void_p(x.data_ptr()),
                ctypes.c_void_p(out.data_ptr()),
                ctypes.c_size_t(x.numel()),
                _DTYPES[x.dtype],
                self._comm,
                self._stream(),
            )  # fmt: skip
        )
        return out

    def close(self) -> None:
        if self._comm:
            self._lib.ncclCommDestroy(self._comm)
            self._comm = ctypes.c_void_p()
