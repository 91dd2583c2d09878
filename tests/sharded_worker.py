"""Run by tests/test_sharded.py under `accelerate launch` (2 CPU processes); writes OUT/rank{r}.json.

    greedy MODEL OUT  the policy prepared as 03 prepares it (DDP, ZeRO-3 or FSDP, from the launch config);
                      greedy completions of 4 toy prompts per process (different ones on each) through
                      training.RolloutWeights, gathered (--rollout fast) and not (--rollout hf); and how
                      many weights this process holds as shards before, inside and after each.
    swap OUT          training.save_checkpoint of a tiny DDP model where process 1 writes its files last.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machinery import dataset, rollout  # noqa: E402
import toy  # noqa: E402
from machinery import training  # noqa: E402


def partitioned(model):
    """Weights this process holds only a shard of: ZeRO-3 (not gathered) or FSDP (DTensor)."""
    return sum(1 for p in model.parameters()
               if getattr(getattr(p, "ds_status", None), "name", "AVAILABLE") != "AVAILABLE"
               or type(p).__name__ == "DTensor")


def greedy(model_dir, out):
    args = training.TrainArgs(model=model_dir, out_dir=out)
    accelerator = training.make_accelerator(args)
    model, processor = training.load_trainable_policy(args, accelerator, lora_r=0)
    optimizer, _ = training.make_optimizer(args, model, 10)
    training.prepare_deepspeed(accelerator, model, 4, 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    problems = toy.toy_dataset("test", 8).select(range(4 * rank, 4 * rank + 4))
    batch = dataset.encode_prompts(processor, list(problems["question"]), list(problems["image"]),
                                   dataset.SYSTEM_PROMPTS["plain"])
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    record = {"kind": accelerator.distributed_type.value, "sharded_before": partitioned(model)}
    for how in ("hf", "fast"):  # hf first: FSDP must set itself up before transformers calls the vision tower
        with training.RolloutWeights(accelerator, model, gather=how == "fast") as policy:
            policy.model.eval()
            record[f"sharded_inside_{how}"] = partitioned(policy.model)
            record[f"path_{how}"] = rollout.fast_path_support(policy.model, bool(policy.synced_gpus))[0]
            ids, mask, _ = rollout.generate(policy.model, processor, batch, max_new_tokens=24, temperature=0.0,
                                            rollout=how, synced_gpus=policy.synced_gpus)
        record[how] = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        record[f"sharded_after_{how}"] = partitioned(model)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    accelerator.end_training()


def swap(out):
    accelerator = training.make_accelerator(training.TrainArgs(cpu=True, out_dir=out))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not accelerator.is_main_process:  # a process that is slower to write (a busy disk, a bigger shard)
        accelerator.register_save_state_pre_hook(lambda *_: time.sleep(1))
    training.save_checkpoint(accelerator, os.path.join(out, "checkpoint"), scheduler=scheduler, step=1)
    with open(os.path.join(out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"kind": accelerator.distributed_type.value}, f)
    accelerator.end_training()


if __name__ == "__main__":
    {"greedy": greedy, "swap": swap}[sys.argv[1]](*sys.argv[2:])
