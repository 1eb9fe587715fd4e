"""The YAML schema, the builder's placement, and every shipped config and manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pdserve.cluster.config import ModelConfig
from pdserve.deploy.app import _check_tp, _deployment_options, weights_digest
from pdserve.deploy.schema import AppSpec, PoolSpec
from pdserve.deploy.serve_app import load_config

ROOT = Path(__file__).resolve().parents[2]


def _spec(**kw) -> AppSpec:
    return AppSpec.model_validate({"model": {"preset": "tiny"}, **kw})


def test_defaults_are_one_prefill_one_decode():
    spec = _spec()
    assert not spec.colocated and spec.prefill.tp == 1 and spec.decode.num_replicas is None
    assert _spec(prefill=None).colocated


@pytest.mark.parametrize(
    "args, needle",
    [
        ({"model": {}}, "path"),
        (
            {
                "model": {"preset": "tiny"},
                "decode": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}},
            },
            "not both",
        ),
        (
            {
                "model": {"preset": "tiny"},
                "decode": {"autoscaling_config": {"min_replicas": 4, "max_replicas": 3}},
            },
            "min_replicas",
        ),
        ({"model": {"preset": "tiny"}, "prefill": {"tp": 2, "gpus_per_rank": 0.5}}, "whole GPUs"),
        ({"model": {"preset": "tiny"}, "prefill": None, "kv_transport": "nccl"}, "colocated"),
        (
            {"model": {"preset": "tiny"}, "decode": {"kernels": {"moe_huge": "triton"}}},
            "unknown ops",
        ),
        ({"model": {"preset": "tiny"}, "decode": {"tp": 0}}, "tp"),
        ({"model": {"preset": "tiny"}, "decode": {"max_num_seqs": "lots"}}, "max_num_seqs"),
        ({"model": {"preset": "tiny"}, "decode": {"typo_field": 1}}, "typo_field"),
    ],
)
def test_bad_configs_name_the_problem(args, needle):
    with pytest.raises(ValidationError, match=needle):
        AppSpec.model_validate(args)


def test_tp_must_split_the_model(tiny_model):
    cfg = ModelConfig.from_dir(tiny_model)
    _check_tp("decode", 2, cfg)
    with pytest.raises(ValueError, match="num_attention_heads"):
        _check_tp("decode", 3, cfg)
    _check_tp("prefill", 4, cfg)  # 64 expert dims / 4 = 16 per rank: held in 32-blocks


def test_placement_of_single_rank_and_tp_replicas():
    one = _deployment_options(PoolSpec(num_replicas=3, resources={"decode_node": 1}), "Decode", 1.0)
    assert one["num_replicas"] == 3
    assert one["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "resources": {"decode_node": 1},
    }
    tp = _deployment_options(PoolSpec(tp=2, autoscaling_config={"max_replicas": 4}), "Prefill", 1.0)
    assert "num_replicas" not in tp and tp["autoscaling_config"]["max_replicas"] == 4
    assert tp["placement_group_bundles"][1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert tp["placement_group_strategy"] == "STRICT_PACK"
    cpu = _deployment_options(PoolSpec(tp=2), "Prefill", 0.0)
    assert cpu["placement_group_bundles"][1:] == [{"CPU": 1.0}] * 2  # no zero-GPU entries


def test_weights_digest_tracks_the_checkpoint(tiny_model, yarn_model):
    assert weights_digest(Path(tiny_model)) == weights_digest(Path(tiny_model))
    assert weights_digest(Path(tiny_model)) != weights_digest(Path(yarn_model))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "deploy" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_validate(path):
    args, http = load_config(path)
    AppSpec.model_validate(args)
    assert http["port"] == 8000


def test_kuberay_manifest_embeds_a_valid_app():
    manifest = yaml.safe_load((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    spec = AppSpec.model_validate(app["args"])
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    # each pool asks for the custom resource its worker group advertises
    assert (
        set(spec.prefill.resources) == {"prefill_node"}
        and "prefill_node" in groups["prefill"]["rayStartParams"]["resources"]
    )
    assert (
        set(spec.decode.resources) == {"decode_node"}
        and "decode_node" in groups["decode"]["rayStartParams"]["resources"]
    )
    launcher = yaml.safe_load((ROOT / "deploy" / "k8s" / "ray-cluster-launcher.yaml").read_text())
    types = launcher["available_node_types"]
    assert (
        types["prefill"]["resources"]["prefill_node"]
        and types["decode"]["resources"]["decode_node"]
    )
