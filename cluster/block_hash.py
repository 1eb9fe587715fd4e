"""Content keys of full KV blocks: a hash chain over their tokens.

Block i's key hashes block i - 1's key and block i's token ids, so equal keys mean equal
prefixes, not just equal blocks, and two engines that hash the same tokens agree (blake2b,
not Python's per-process ``hash``). Integers and bytes only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

SEED = b"pdserve-kv-block"


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    first: int = 0,
) -> list[bytes]:
    """Grow ``hashes`` (the keys of a sequence's first blocks, in place) to ``num_blocks`` keys;
    returns it. ``token_ids`` holds the sequence from token ``first`` on (at most the start of
    the first block still without a key), so a caller need not copy what has keys already. Only
    whole blocks get keys: ``num_blocks * block_size`` tokens at most."""
    end = first + len(token_ids)
    assert num_blocks * block_size <= end, (num_blocks, block_size, end)
    assert first <= len(hashes) * block_size, (first, len(hashes), block_size)
    for i in range(len(hashes), num_blocks):
        start = i * block_size - first
        h = hashlib.blake2b(hashes[-1] if hashes else SEED, digest_size=16)
        h.update(array("q", token_ids[start : start + block_size]).tobytes())
        hashes.append(h.digest())
    return hashes


def prompt_block_keys(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The keys of a prompt's full blocks, its last token left out: the prefix an engine can
    match in its cache (at least one token must still run)."""
    return extend_block_hashes([], token_ids, block_size, (len(token_ids) - 1) // block_size)
