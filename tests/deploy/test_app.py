"""The app builder: the model directory (a preset's directory made for weights drawn at load,
config and tokenizer alone, gets its weights when a later deployment reads them) and the KV
transport ``auto`` stands for."""

from __future__ import annotations

import pytest

from pdserve.cluster.checkpoint_maker import make_model
from pdserve.deploy.app import kv_transport, resolve_model, weights_digest
from pdserve.deploy.schema import AppSpec, ModelSpec


def test_a_config_only_preset_directory_is_completed_for_a_deployment_that_reads_weights(
    tmp_path,
):
    path = tmp_path / "tiny"
    drawn = ModelSpec(path=str(path), preset="tiny", random_weights_seed=1)
    assert resolve_model(drawn) == path and not list(path.glob("*.safetensors"))
    assert resolve_model(ModelSpec(path=str(path), preset="tiny")) == path
    assert list(path.glob("*.safetensors"))  # made now
    assert weights_digest(path) != weights_digest(path, 1)  # a drawn model is another model
    make_model(tmp_path / "other", "tiny", weights=False)
    assert resolve_model(ModelSpec(path=str(tmp_path / "other"))) == tmp_path / "other"


def _spec(transport: str, colocated: bool = False) -> AppSpec:
    args = {"model": {"preset": "tiny"}, "kv_transport": transport}
    return AppSpec.model_validate(args | ({"prefill": None} if colocated else {}))


@pytest.mark.parametrize(
    "prefill, decode, want",
    [(1, 1, "nccl"), (2, 1, "nccl"), (0.5, 0.5, "object_store"), (1, 0.5, "object_store"),
     (0, 0, "object_store"), (1, 0, "object_store")],
)  # fmt: skip
def test_auto_picks_nccl_only_where_both_pools_hold_whole_gpus(prefill, decode, want):
    assert kv_transport(_spec("auto"), {"prefill": prefill, "decode": decode}) == want
    assert kv_transport(_spec("object_store"), {"prefill": prefill, "decode": decode}) == (
        "object_store"
    )


def test_nccl_with_ranks_that_may_share_a_gpu_is_refused():
    assert kv_transport(_spec("nccl"), {"prefill": 1, "decode": 1}) == "nccl"
    assert kv_transport(_spec("nccl"), {"prefill": 0, "decode": 0}) == "nccl"  # gloo on CPU
    with pytest.raises(ValueError, match="whole GPUs.*prefill 0.5, decode 0.5"):
        kv_transport(_spec("nccl"), {"prefill": 0.5, "decode": 0.5})
    assert kv_transport(_spec("auto", colocated=True), {"decode": 0.5}) == "object_store"
