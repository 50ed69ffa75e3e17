"""Run by tests/train/test_trainer.py: two gloo ranks on CPU build, for ZeRO 0-3 with bf16 and LoRA, the engine
the trainer's DeepSpeed config and loader build, and take one step with it; under ZeRO-3 also the separate
reference, sharded, scored against the whole model. Rank 0 writes what it found as JSON.

Usage: python deepspeed_ranks.py MODEL_FOLDER OUT_JSON (a tiny random Llama is written to MODEL_FOLDER first).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def engine_facts(stage: int, folder: str, rank: int) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from selfimprove.config import TrainConfig
    from selfimprove.train.data import Example, collate
    from selfimprove.train.worker import (
        _load_model,
        _load_reference,
        _reference_logps,
        deepspeed_config,
        sequence_logps,
    )

    shard = [Example([1, 2, 3], [4, 5], [6]), Example([1, 2], [7], [8, 9])]
    cpu = torch.device("cpu")
    tc = TrainConfig(zero_stage=stage, lora=True, lora_targets=["q_proj", "v_proj"], precision="bf16",
                     batch_size=2, micro_batch_size=1, num_workers=2)
    ds = deepspeed_config(tc, 2, use_gpu=False)
    model, loading = _load_model(folder, tc, ds)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    unset_hf_deepspeed_config()
    optimizer = engine.basic_optimizer
    facts = {"optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
             "fused": optimizer.defaults.get("fused"),
             "trainable": sorted({str(p.dtype) for p in engine.module.parameters() if p.requires_grad}),
             "sharded": all(hasattr(p, "ds_id") for p in engine.module.parameters())}
    before = _reference_logps(engine, shard, tc, 0, cpu)
    engine.backward(-sequence_logps(engine, collate([shard[rank]], 0), cpu)[0].sum())
    engine.step()
    if stage == 3:
        reference = _load_reference(folder, tc, cpu, ds)
        facts["reference"] = type(reference).__name__
        facts["reference_sharded"] = all(p.ds_tensor.numel() < p.ds_numel for p in reference.module.parameters()
                                         if p.ds_numel > 1)
        sharded = _reference_logps(reference, shard, tc, 0, cpu)
        reference.destroy()
        whole = _reference_logps(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), shard, tc, 0, cpu)
        facts["reference_equals_whole"] = torch.equal(sharded, whole)
        facts["policy_before_training_equals_whole"] = torch.equal(before, whole)
    engine.destroy()
    return facts


def run(rank: int, folder: str, out: str) -> None:
    from selfimprove.train.worker import init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    init_distributed(use_gpu=False)
    torch.manual_seed(0)
    found = {stage: engine_facts(stage, folder, rank) for stage in (0, 1, 2, 3)}
    if rank == 0:
        found["built"] = sorted(os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]))
        with open(out, "w") as f:
            json.dump(found, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, out = sys.argv[1], sys.argv[2]
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    mp.spawn(run, args=(folder, out), nprocs=2)
