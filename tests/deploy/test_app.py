"""The app builder's model directory: a preset's directory made for weights drawn at load
(config and tokenizer alone) gets its weights when a later deployment reads them."""

from __future__ import annotations

from pdserve.cluster.checkpoint_maker import make_model
from pdserve.deploy.app import resolve_model, weights_digest
from pdserve.deploy.schema import ModelSpec


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
