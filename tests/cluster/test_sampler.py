from __future__ import annotations

import pytest
import torch

from pdserve.cluster.sampler import Sampler, token_seed
from pdserve.cluster.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _draw(sp: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed)
    out = sampler(LOGITS.repeat(n, 1), [sp] * n, [0] * n)
    return torch.bincount(torch.tensor([o.token_id for o in out]), minlength=4).float() / n


def test_plain_sampling_follows_the_distribution():
    freq = _draw(SamplingParams(temperature=1.0))
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_temperature_sharpens():
    freq = _draw(SamplingParams(temperature=0.5))
    p = torch.softmax(LOGITS / 0.5, dim=-1)
    torch.testing.assert_close(freq, p, atol=0.03, rtol=0)


def test_top_k_and_top_p_restrict_the_support():
    assert _draw(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    # mass before token 2 is 0.8 >= 0.7, so only tokens 0 and 1 remain
    freq = _draw(SamplingParams(temperature=1.0, top_p=0.7))
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375]), atol=0.03, rtol=0)


def test_greedy_and_seeded_rows_in_one_batch():
    sampler = Sampler(torch.device("cpu"), 0)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(6))
    logits[3] = logits[5] = logits[2]  # rows 2, 3 and 5 see the same distribution
    params = [SamplingParams(temperature=0)] * 2 + [SamplingParams(temperature=1.0, seed=42)] * 4
    idx = [0, 0, 3, 3, 4, 3]
    a = [o.token_id for o in sampler(logits, params, idx)]
    b = [o.token_id for o in Sampler(torch.device("cpu"), 99)(logits, params, idx)]
    assert a[:2] == logits[:2].argmax(-1).tolist()
    assert a[2:] == b[2:]  # seeded rows do not depend on the sampler's own generator
    assert a[2] == a[3] == a[5]  # same seed, same token index, same logits
    assert token_seed(42, 3) != token_seed(42, 4) and token_seed(1, 0) != token_seed(0, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_logprobs_are_log_softmax(device):
    """On either device (from a GPU the draw comes back through pinned memory)."""
    sampler = Sampler(torch.device(device), 0)
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    out = sampler(
        logits.to(device),
        [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)],
        [0, 0],
    )
    ref = torch.log_softmax(logits[0].double(), -1)
    assert out[0].token_id == ref.argmax().item()
    assert out[0].logprob == pytest.approx(ref.max().item(), abs=1e-5)
    assert [t for t, _ in out[0].top_logprobs] == ref.topk(2).indices.tolist()
    top_values = [v for _, v in out[0].top_logprobs]
    assert top_values == pytest.approx(ref.topk(2).values.tolist(), abs=1e-5)
    assert out[1].token_id == logits[1].argmax().item()
    assert out[1].logprob is None and out[1].top_logprobs is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_draw_hands_its_rows_to_the_next_step_and_its_tokens_to_the_host(device):
    """``rows`` feeds a step planned ahead on the device; on a GPU the copy to the host is
    queued with the draw, ahead of the next step's work."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)).to(device)
    greedy = [SamplingParams(temperature=0)] * 4
    draw = Sampler(torch.device(device), 0).draw(logits, greedy, [0] * 4)
    best = logits.argmax(-1).tolist()
    assert draw.rows((0, 1, 2)).tolist() == best[:3]
    assert draw.rows((3, 1)).tolist() == [best[3], best[1]]
    assert (draw.copied is not None) == (device == "cuda")
    assert [t.token_id for t in draw.to_host()] == best
