"""Run by tests/test_grpo.py and tests/test_updates.py, alone or under `accelerate launch` with several
processes: one grpo_step (03_grpo.py) on a fixed batch whose prompts are split over the processes (process r
takes prompts r, r + world, ...), the accuracy filter keeping a different number of groups on each. Plain SGD
at lr 1, so the weights move by exactly minus the gradient. The main process saves the trainable weights.

K > 1 (--updates_per_rollout): each process splits its kept groups into K slices (update_slices, shuffled by
its rank); a single process given SPLIT > 1 takes, for slice k, the union of the slices k that SPLIT
processes would take, so that it must make the same K optimizer steps as those processes together.

    python tests/grpo_step_worker.py MODEL_DIR OUT.safetensors LOSS_AGG [K] [SPLIT]
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machinery import dataset  # noqa: E402
import toy  # noqa: E402
from machinery import training  # noqa: E402
from conftest import load_script  # noqa: E402

P, G, T = 6, 2, 7
KEEP = [True, False, True, True, True, False]  # process 0 of 2 keeps 3 groups, process 1 keeps 1


def main(model_dir, out, loss_agg, K="1", split="1"):
    grpo = load_script("03_grpo")
    K, split = int(K), int(split)
    args = grpo.Args(model=model_dir, out_dir=os.path.dirname(out), cpu=True, micro_batch=3, grad_clip=1e9,
                     loss_agg=loss_agg, max_new_tokens=T, updates_per_rollout=K)
    accelerator = training.make_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    model, processor = training.load_trainable_policy(args, accelerator, lora_r=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    # The whole batch, the same on every process: prompts, completions, masks, advantages.
    g = torch.Generator().manual_seed(0)
    ds = toy.toy_dataset("test", P)
    vs = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    enc = dataset.encode_prompts(processor, list(ds["question"]), list(ds["image"]), dataset.SYSTEM_PROMPTS["reflect"])
    group = dataset.repeat_for_group(enc, G, vs)
    comp = torch.randint(100, 600, (P * G, T), generator=g)
    lengths = torch.randint(1, T + 1, (P * G,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(P * G, generator=g)

    def process_slices(r, n):  # process r of n: its slices, in rows of the whole batch
        mine = list(range(r, P, n))  # its prompts
        keep = torch.tensor([KEEP[i] for i in mine])
        slices = grpo.update_slices(keep, G, K, lockstep=False, generator=torch.Generator().manual_seed(r))
        return [([mine[i // G] * G + i % G for i in rows], w) for rows, w in slices]

    if world > 1:
        slices = process_slices(rank, world)
    else:  # the union, slice by slice, of what `split` processes would take
        per_process = [process_slices(r, split) for r in range(split)]
        slices = [([i for p in per_process for i in p[k][0]], torch.cat([p[k][1] for p in per_process]))
                  for k in range(K)]
    model.train()
    grpo.grpo_step(model, None, accelerator, optimizer, scheduler, group, comp, mask, adv, slices, args, vs)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file({n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
