"""Generation with Hugging Face `generate` (moves into rollout.py with the fast rollout path)."""

import torch

import dataset
import policy


def vision_token_ids(processor):
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def eos_token_ids(processor):
    tok = processor.tokenizer
    return sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})

def completion_mask(completion_ids, eos_ids):
    """1 up to and including the first end-of-sequence token, 0 after it: by POSITION, never by
    pad value (pad and EOS may be the same id). (B, T) -> (B, T)

    Example: eos=2, [[5, 2, 2, 7]] -> [[1, 1, 0, 0]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return (torch.arange(T, device=completion_ids.device)[None] <= first[:, None]).long()


@torch.no_grad()
def generate(model, processor, batch, *, max_new_tokens, temperature=0.0, top_p=1.0, min_new_tokens=None,
             synced_gpus=None):
    """Sample (temperature > 0, plain softmax(logits / T) with top-p, no top-k) or decode greedily.

    Returns (completion_ids (B, T), completion_mask (B, T), texts). Vision special tokens are
    suppressed: a sampled <|image_pad|> would break the next forward pass with an image.
    """
    gen = policy.unwrap(model)
    eos = eos_token_ids(processor)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id,
                  suppress_tokens=vision_token_ids(processor), use_cache=True, synced_gpus=synced_gpus)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    batch = {k: v.to(gen.device) for k, v in batch.items()}
    out = gen.generate(**batch, **kwargs)
    completion = out[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(completion, eos)
    texts = [processor.tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion, mask)]
    return completion, mask, texts


def generate_responses(model, processor, questions, images, *, system_prompt, max_new_tokens,
                       temperature=0.0, batch_size=8, desc="generate"):
    """Answer many questions in batches (left-padded) with a progress bar. Returns the texts."""
    from tqdm.auto import tqdm

    policy.unwrap(model).eval()
    texts = []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        batch = dataset.encode_prompts(processor, questions[i:i + batch_size], images[i:i + batch_size], system_prompt)
        texts += generate(model, processor, batch, max_new_tokens=max_new_tokens, temperature=temperature)[2]
    return texts
