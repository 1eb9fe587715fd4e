"""transformers' greedy tokens: the reference the engine and the cluster are held to."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy token ids of transformers model ``hf`` after ``prompt``, never stopping
    early. An explicit mask: otherwise generate() takes id 0 for padding and masks it."""
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()
