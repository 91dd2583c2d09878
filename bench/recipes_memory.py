"""The memory estimate (training.memory_parts, what 02 and 03 print before their first step) of every
real-scale recipe the README gives, per GPU, without a GPU: the architectures (Qwen2.5-VL-7B and -32B,
Qwen3-VL-8B) are built on the meta device (no weights) to count parameters.

    python bench/recipes_memory.py          # one line per recipe, ~10 s
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_gpu  # noqa: E402
from machinery import policy  # noqa: E402
import toy  # noqa: E402
from machinery import training  # noqa: E402

# Qwen2.5-VL-32B-Instruct's text model (its config.json); the vision tower is 7B's with a wider merger.
SIZES_32B = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                 num_key_value_heads=8)
# Qwen3-VL-8B-Instruct, its config.json's numbers as two sources give them alike (the file itself was not at
# hand): the metadata of Ollama's GGUF of it (ollama.com/library/qwen3-vl:8b-instruct) and the config.json of
# nvidia/Cosmos-Reason2-8B, a fine-tune of it; built, 8.77 B parameters, as published for the model. 36 layers
# of hidden 4096 (32 query, 8 key/value heads of 128; MLP 12,288), vocabulary 151,936, lm_head not tied;
# interleaved M-RoPE [24, 20, 20], theta 5e6; vision: 27 blocks of 1152 (16 heads, MLP 4304), 16-px
# patches, merged 2x2 to 4096, DeepStack from vision blocks 8, 16 and 24.
QWEN3_VL_8B = dict(
    text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                                      "mrope_section": [24, 20, 20]}),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False)
NF4_BYTES = 0.5 + 0.016  # packed 4-bit weights + double-quantised absmax per 64-weight block

# name: (size, how the weights train, GPUs, ZeRO stage or "fsdp" or 0, sequences in a rollout (prompts per
# process x G; 0 = SFT), prompt tokens, new tokens, --micro_batch, --gradient_checkpointing)
RECIPES = {
    "02 SFT 7B, ZeRO-3, 8 GPUs": ("7B", "full", 8, 3, 0, 1024, 3072, 1, True),
    "03 GRPO 7B, ZeRO-3, 8 GPUs": ("7B", "full", 8, 3, 16 * 8, 1024, 2048, 4, True),
    "03 GRPO 7B, ZeRO-2, 8 GPUs": ("7B", "full", 8, 2, 16 * 8, 1024, 2048, 4, True),
    "03 GRPO 7B, one GPU, QLoRA r16": ("7B", "qlora16", 1, 0, 2 * 8, 1024, 2048, 4, True),
    "03 GRPO 32B, ZeRO-3, 16 GPUs, --rollout hf": ("32B", "full", 16, "3hf", 4 * 8, 1024, 2048, 2, True),
    # The 7B recipes on Qwen3-VL-8B (~1024 prompt tokens as above). Its KV cache per token is 2.6x 7B's (36
    # layers x 8 key/value heads against 28 x 4): 16 prompts x 8 per GPU no longer fit 80 GB, 8 x 8 do.
    "02 SFT Qwen3-VL-8B, ZeRO-3, 8 GPUs": ("Qwen3-VL-8B", "full", 8, 3, 0, 1024, 3072, 1, True),
    "03 GRPO Qwen3-VL-8B, ZeRO-3, 8 GPUs, 16 prompts per GPU": ("Qwen3-VL-8B", "full", 8, 3, 16 * 8, 1024, 2048, 4,
                                                               True),
    "03 GRPO Qwen3-VL-8B, ZeRO-3, 8 GPUs, 8 prompts per GPU": ("Qwen3-VL-8B", "full", 8, 3, 8 * 8, 1024, 2048, 4, True),
    "03 GRPO Qwen3-VL-8B, ZeRO-2, 8 GPUs, 8 prompts per GPU": ("Qwen3-VL-8B", "full", 8, 2, 8 * 8, 1024, 2048, 4, True),
    "03 GRPO Qwen3-VL-8B, one GPU, QLoRA r16": ("Qwen3-VL-8B", "qlora16", 1, 0, 2 * 8, 1024, 2048, 4, True),
}


def architecture(size):
    """(text config, parameters by part) of Qwen2.5-VL-7B or -32B or Qwen3-VL-8B, built on the meta device."""
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig

    if size == "Qwen3-VL-8B":
        config = Qwen3VLConfig(**QWEN3_VL_8B)
    else:
        config = bench_gpu.model_config(toy.build_tokenizer())
    if size == "32B":
        for k, v in SIZES_32B.items():
            setattr(config.text_config, k, v)
        config.text_config.layer_types = ["full_attention"] * SIZES_32B["num_hidden_layers"]
        config.vision_config.out_hidden_size = SIZES_32B["hidden_size"]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    parts = {"visual": 0, "linear": 0, "other": 0, "lora16": 0}
    for name, p in model.named_parameters():
        if name.startswith("model.visual"):
            parts["visual"] += p.numel()
        elif p.dim() == 2 and "language_model" in name and "embed" not in name:
            parts["linear"] += p.numel()
            parts["lora16"] += 16 * sum(p.shape)  # LoRA r = 16 on every linear layer of the language model
        else:
            parts["other"] += p.numel()  # embeddings, lm_head, norms
    return config.get_text_config(decoder=True), parts


def estimate(size, how, gpus, zero, sequences, prompt, new, micro, checkpointing, cache={}):
    if size not in cache:
        cache[size] = architecture(size)
    text, n = cache[size]
    total = n["visual"] + n["linear"] + n["other"]
    if how == "qlora16":  # nf4 language-model linears, the rest bf16; LoRA adapters train in fp32
        weight_bytes, n_train = n["linear"] * NF4_BYTES + (n["visual"] + n["other"]) * 2 + n["lora16"] * 4, n["lora16"]
    else:  # bf16 weights; the language model trains (vision frozen)
        weight_bytes, n_train = total * 2, n["linear"] + n["other"]
    hf = zero == "3hf"
    return training.memory_parts(text, weight_bytes=weight_bytes, n_train=n_train, act_bytes=2, world=gpus,
                                 zero=3 if hf else zero, fsdp=False, sequences=sequences, prompt_len=prompt,
                                 new_tokens=new, micro_batch=micro, checkpointing=checkpointing,
                                 gathered_rollout=sequences > 0 and not hf)


def main():
    for name, recipe in RECIPES.items():
        parts = estimate(*recipe)
        print(f"{name}: {sum(parts.values()):.0f} GB per GPU = "
              + " + ".join(f"{k} {v:.1f}" for k, v in parts.items() if v >= 0.05))
    for size in ("7B", "Qwen3-VL-8B"):
        text, n = architecture(size)
        print(f"({size}: {sum(v for k, v in n.items() if k != 'lora16') / 1e9:.2f} B parameters, "
              f"{n['visual'] / 1e9:.2f} B in the vision tower, LoRA r16 {n['lora16'] / 1e6:.0f} M)")


if __name__ == "__main__":
    main()
