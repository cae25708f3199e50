"""Every shipped YAML/JSON parses and is accepted by what reads it."""

import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils.deepspeed import HfDeepSpeedConfig

from moe_reason.training.arguments import parse_args

from conftest import REPO

ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TRAINER_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping")


def test_the_shipped_sets_are_there():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"cpu_single", "cpu_ddp", "gpu_single", "gpu_multi", "deepspeed_zero1", "deepspeed_zero2",
            "deepspeed_zero3", "deepspeed_zero3_offload", "deepspeed_multinode"} <= names
    assert {p.stem for p in DS_CONFIGS} == {"zero1", "zero2", "zero3", "zero3_offload"}
    assert RUN_CONFIGS


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_holds_launch_facts_only(path):
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert "mixed_precision" not in raw and "gradient_accumulation_steps" not in raw  # training arguments decide
    ds_file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file:
        assert (REPO / ds_file).is_file(), ds_file
        assert not set(raw["deepspeed_config"]) & {"gradient_clipping", "zero_stage", "offload_optimizer_device"}
    hostfile = (raw.get("deepspeed_config") or {}).get("deepspeed_hostfile")
    if hostfile:
        assert (REPO / hostfile).is_file()
    assert config.num_processes >= 1


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_one_machine_configs_take_a_free_port_so_two_jobs_do_not_collide(path):
    raw = yaml.safe_load(path.read_text())
    if raw.get("num_machines", 1) == 1 and raw.get("num_processes", 1) > 1:
        assert raw.get("main_process_port") == 0, "0 lets Accelerate pick a free port at launch"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_parses_and_leaves_trainer_values_auto(path):
    config = json.loads(path.read_text())
    HfDeepSpeedConfig(config)  # accelerate/transformers' own reader
    for key in TRAINER_OWNED:
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"]["stage"] in (1, 2, 3)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_is_accepted_by_the_trainer_parser(path):
    model_args, data_args, train_args = parse_args([str(path)])
    assert model_args.model_preset and train_args.max_steps >= 1


def test_default_yaml_is_the_default_run():
    file_args = [vars(a) for a in parse_args([str(REPO / "configs/default.yaml")])]
    defaults = [vars(a) for a in parse_args([])]
    assert file_args == defaults


def test_flags_override_file_values():
    _, _, train_args = parse_args([str(REPO / "configs/default.yaml"), "--max_steps", "7"])
    assert train_args.max_steps == 7
