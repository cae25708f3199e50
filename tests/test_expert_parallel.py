"""Expert parallelism on CPU: 2 real processes over gloo, DeepSpeed's expert groups and ZeRO-2."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_reason.parallel.expert_parallel import check_layout

from conftest import (REPO, assert_export_cli_matches_final, eval_records, evaluate_export, free_port, launch,
                      python_run, read_metrics, train_args, train_losses, warm_args, warm_env, write_corpus)

ZERO2 = "accelerate_configs/deepspeed_zero2.yaml"


@pytest.mark.parametrize("layout, message", [
    (dict(num_experts=4, ep_size=3, world_size=3, zero_stage=2), "does not divide num_experts=4"),
    (dict(num_experts=4, ep_size=2, world_size=3, zero_stage=2), "does not divide the world size 3"),
    (dict(num_experts=4, ep_size=2, world_size=2, zero_stage=None), "needs DeepSpeed ZeRO stage 0, 1 or 2"),
    (dict(num_experts=4, ep_size=2, world_size=2, zero_stage=3), "use ZeRO-2 with expert parallelism"),
])
def test_each_impossible_layout_has_its_error(layout, message):
    with pytest.raises(ValueError, match=message):
        check_layout(**layout)
    check_layout(num_experts=8, ep_size=2, world_size=4, zero_stage=2)  # valid: 2 EP groups of 2, EDP size 2
    check_layout(num_experts=4, ep_size=1, world_size=1, zero_stage=None)


@pytest.mark.slow
def test_sharded_block_matches_the_full_block_and_survives_an_empty_rank(tmp_path):
    """Forward, input/router/expert gradients of an EP=2 block equal the unsharded block's, also when
    every token goes to rank 0's experts (rank 1 and experts 2, 3 receive nothing); a recursive EP model
    whose ranks halt at different steps in evaluation keeps them in step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *warm_args([REPO / "tests" / "distributed_ep_check.py", tmp_path])]
    result = subprocess.run(cmd, cwd=REPO, env=warm_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for case in ("random", "rank1_empty"):
        for name in ("output", "input_grad", "router_grad", "up_proj_grad", "down_proj_grad"):
            assert found[f"{case}/{name}"] < 1e-5, (case, name, found[f"{case}/{name}"])
    assert found["rank1_empty/tokens_per_expert"][2:] == [0, 0] and found["rank1_empty/rows_per_rank"][1] == 0
    assert min(found["random/rows_per_rank"]) > 0
    assert found["gathered_up_proj_diff"] == 0.0 and found["shard_round_trip_diff"] == 0.0
    assert "expert_parallel_size=2" in found["wrong_size_error"] and "--init_from" in found["wrong_size_error"]
    # ranks halting at different steps in evaluation stayed in step (issue: gloo aborted, NCCL would hang)
    assert found["recursive_eval/steps_per_rank"] == [[1.0, 1.0], [3.0, 3.0]]
    assert found["recursive_eval/loss_finite"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """EP=1 and EP=2, both 2-process ZeRO-2 on the same data and seed, 10 steps, checkpoints at 5 and 10.

    The tests that share these runs form one xdist group (`--dist loadgroup`): one worker makes them once."""
    tmp = tmp_path_factory.mktemp("ep")
    corpus = write_corpus(tmp, n=80)
    folders = {}
    for ep in (1, 2):
        folders[ep] = tmp / f"ep{ep}"
        result = launch(train_args(tmp, corpus, output_dir=folders[ep], max_steps=10, save_interval=5,
                                   eval_interval=5, eval_batches=1, per_device_eval_batch_size=8,
                                   expert_parallel_size=ep), config_file=ZERO2)
        assert "2 process(es) (DEEPSPEED)" in result.stdout
    return tmp, corpus, folders


@pytest.mark.slow
@pytest.mark.xdist_group("expert_parallel_runs")
def test_ep2_matches_ep1_step_by_step_and_exports_the_same_full_weights(runs):
    tmp, corpus, folders = runs
    one, two = train_losses(folders[1]), train_losses(folders[2])
    assert sorted(two) == list(range(1, 11))
    # the same arithmetic up to the grouped matmul's row blocking (measured: <= 1e-6 over 10 steps)
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert two[10] < two[1] - 0.1  # and it learns
    a, b = load_file(folders[1] / "final" / "model.safetensors"), load_file(folders[2] / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert b["model.layers.0.mlp.experts.up_proj"].shape[0] == 4  # full experts, not this rank's 2
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("expert_parallel_runs")
def test_ep2_export_loads_in_one_process_and_reproduces_the_trainers_val_loss(runs):
    tmp, corpus, folders = runs
    trainer_loss = eval_records(folders[2])[-1]["eval/loss"]
    assert evaluate_export(folders[2] / "final", tmp, corpus) == pytest.approx(trainer_loss, abs=1e-5)
    assert_export_cli_matches_final(folders[2])  # the expert shards stitched in rank order
    logged = read_metrics(folders[2])[0]
    rows = [logged[f"expert_parallel/rows_layer{layer}_rank{rank}"] for layer in (0, 1) for rank in (0, 1)]
    # per layer, both ranks' rows add up to every token's k assignments: 2 ranks x 4 blocks x 32 tokens x top-2
    assert rows[0] + rows[1] == rows[2] + rows[3] == 2 * 4 * 32 * 2
    assert logged["expert_parallel/rank_imbalance"] >= 1.0


@pytest.mark.slow
@pytest.mark.xdist_group("expert_parallel_runs")
def test_ep2_checkpoint_resumes_exactly_at_ep2_and_refuses_another_size(runs):
    tmp, corpus, folders = runs
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(folders[2] / "checkpoint-5", resumed / "checkpoint-5")
    argv = train_args(tmp, corpus, output_dir=resumed, max_steps=10, save_interval=5, eval_interval=5,
                      eval_batches=1, per_device_eval_batch_size=8, resume_from_checkpoint="latest")
    refused = python_run([REPO / "train.py", *argv, "--expert_parallel_size", "1"], timeout=120)
    assert refused.returncode != 0 and "saved with expert_parallel_size=2, not 1" in refused.stderr
    launch(argv + ["--expert_parallel_size", "2"], config_file=ZERO2)
    straight = train_losses(folders[2])
    assert train_losses(resumed) == {step: straight[step] for step in range(6, 11)}  # bit for bit


@pytest.mark.slow
@pytest.mark.xdist_group("expert_parallel_runs")
def test_an_export_loads_for_training_at_another_ep_size(runs):
    """EP=1's export trained on at EP=2: sharding a loaded model keeps its function (a ~0 learning rate step)."""
    tmp, corpus, folders = runs
    out = tmp / "from_ep1"
    launch(train_args(tmp, corpus, output_dir=out, max_steps=1, eval_interval=1, save_interval=1, eval_batches=1,
                      per_device_eval_batch_size=8, learning_rate=1e-12, warmup_steps=0, expert_parallel_size=2,
                      init_from=str(folders[1] / "final")), config_file=ZERO2)
    assert eval_records(out)[-1]["eval/loss"] == pytest.approx(eval_records(folders[1])[-1]["eval/loss"], abs=1e-5)


@pytest.mark.slow
def test_expert_parallelism_under_plain_ddp_is_refused_before_training(tmp_path):
    corpus = write_corpus(tmp_path, n=80)
    result = launch(train_args(tmp_path, corpus, output_dir=tmp_path / "run", expert_parallel_size=2),
                    config_file="accelerate_configs/cpu_ddp.yaml", check=False)
    assert result.returncode != 0 and "needs DeepSpeed ZeRO stage 0, 1 or 2" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-1").exists()
