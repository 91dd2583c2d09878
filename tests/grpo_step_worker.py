"""Run by tests/test_grpo.py, alone or under `accelerate launch` with several processes: one grpo_step
(03_grpo.py) on a fixed batch whose prompts are split over the processes (process r takes prompts r,
r + world, ...), the accuracy filter keeping a different number of groups on each. Plain SGD at lr 1, so
the weights move by exactly minus the gradient. The main process saves the trainable weights.

    python tests/grpo_step_worker.py MODEL_DIR OUT.safetensors LOSS_AGG
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


def main(model_dir, out, loss_agg):
    grpo = load_script("03_grpo")
    args = grpo.Args(model=model_dir, out_dir=os.path.dirname(out), cpu=True, micro_batch=3, grad_clip=1e9,
                     loss_agg=loss_agg, max_new_tokens=T)
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

    mine = [i for i in range(rank, P, world)]  # this process's prompts
    keep = torch.tensor([KEEP[i] for i in mine])
    rows, _ = grpo.training_rows(keep, G, lockstep=False)
    full_rows = [i * G + k for i in mine for k in range(G)]
    rows = [full_rows[r] for r in rows]
    model.train()
    grpo.grpo_step(model, None, accelerator, optimizer, scheduler, dataset.select_rows(group, rows, vs), comp[rows],
                   mask[rows], adv[rows], int(keep.sum()) * G, args, vs)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file({n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
