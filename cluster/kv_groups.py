"""Which cache slot each layer's KV lives in, and which blocks a sliding layer still needs.

A model whose layers all see the whole context (DeepSeek-V3) has one group: layer l's KV is
cache slot l. A model with sliding-window layers (GPT-OSS: every other layer a 128-token window)
has two: full layers and sliding layers, each numbered in layer order, and a slot holds the
full layer and the sliding layer of the same number (the cache has as many slots as the larger
group has layers). A block id then names a block of one group: a request holds two block tables
of the same logical length (block i holds positions [i * block_size, (i + 1) * block_size)),
``Request.block_ids`` for the full layers and ``Request.window_block_ids`` for the sliding ones,
both drawn from one pool. A sliding table keeps real blocks only for the window (from
``window_start_block`` on); the blocks before it go back to the pool and their entries name the
cache's spare block (``null``), which no request owns and which attention never reads past the
window masks. So a long sequence holds its full layers' blocks and a few window blocks, not
every layer's blocks for every token: GPT-OSS's cache holds about twice the tokens.

Integers only: the scheduler and the engine plan with it; the runner and the model map layers to
slots with ``slot_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.cluster.config import ModelConfig

if TYPE_CHECKING:
    from pdserve.cluster.scheduler import ScheduledChunk


@dataclass(frozen=True)
class KVGroups:
    slot_of: tuple[int, ...]  # each layer's cache slot
    window: int  # tokens a sliding layer's query sees, itself included; 0: no sliding layers

    @staticmethod
    def of(cfg: ModelConfig) -> KVGroups:
        return KVGroups.from_windows([cfg.window(i) for i in range(cfg.num_hidden_layers)])

    @staticmethod
    def from_windows(windows: list[int]) -> KVGroups:
        """The groups of layers whose windows are ``windows`` (0: the whole context)."""
        sizes = sorted({w for w in windows if w})
        if len(sizes) > 1:
            raise ValueError(f"sliding layers with different windows {sizes} are not supported")
        count = {0: 0, **{w: 0 for w in sizes}}
        slots = []
        for w in windows:
            slots.append(count[w])
            count[w] += 1
        return KVGroups(tuple(slots), sizes[0] if sizes else 0)

    @property
    def num_slots(self) -> int:
        return max(self.slot_of, default=-1) + 1

    @property
    def windowed(self) -> bool:
        return self.window > 0

    def window_start_block(self, pos: int, block_size: int) -> int:
        """The first block a sliding layer's query at ``pos`` (or later) reads."""
        return max(0, pos - self.window + 1) // block_size if self.window else 0

    def window_blocks(self, num_tokens: int, block_size: int) -> int:
        """Live sliding blocks of a sequence of ``num_tokens`` tokens whose next query is at
        position ``num_tokens``: those from ``window_start_block`` to its last block."""
        if not self.window:
            return 0
        return -(-num_tokens // block_size) - self.window_start_block(num_tokens, block_size)

    def peak_window_blocks(self, chunk: int, block_size: int) -> int:
        """The most sliding blocks a sequence holds while a chunk of up to ``chunk`` tokens
        runs: the window before the chunk's first query and the chunk, over block edges."""
        if not self.window:
            return 0
        return -(-(self.window - 1 + chunk) // block_size) + 1

    def sent_blocks(self, chunk: ScheduledChunk, block_size: int) -> list[int]:
        """The blocks a prompt's KV travels in, once ``chunk`` (its last) ran: from the chunk's
        ``first_sent_block`` (the decode side holds those before) to the prompt's last block,
        then the sliding layers' blocks of the window at its end (the order in which the
        decode role reserves them)."""
        end = -(-chunk.end // block_size)
        start = self.window_start_block(chunk.end, block_size)
        sliding = list(chunk.window_block_ids[start:end])
        return list(chunk.block_ids[chunk.first_sent_block : end]) + sliding

    def most_blocks(self, num_tokens: int, chunk: int, block_size: int) -> int:
        """The most blocks of both tables a sequence of up to ``num_tokens`` tokens holds,
        run in chunks of up to ``chunk`` tokens: what a cache must hold for it to finish."""
        full = -(-num_tokens // block_size)
        return full + min(full, self.peak_window_blocks(chunk, block_size))

    def slots_done_after(self) -> list[list[int]]:
        """For each layer, the slots whose every layer has run once it has: the KV of those
        slots may leave (prefill's layer-group streaming)."""
        done, out = 0, []
        for i in range(len(self.slot_of)):
            upto = min(self.slot_of[i + 1 :], default=self.num_slots)  # slots still to write
            out.append(list(range(done, upto)))
            done = max(done, upto)
        return out
