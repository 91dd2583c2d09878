"""The policy model: loading, saving, where a LoRA adapter's base is, and the log-probabilities of
the tokens it is trained on (selective_log_softmax, used by 02's and 03's losses).

One loading path serves the toy model and the real models alike: a local directory or a hub id, a
dtype, optional 4-bit (bitsandbytes nf4) and LoRA (peft), and a frozen vision tower (the paper freezes
the vision encoder and projector in both stages). The class is the one the checkpoint's config names
(`AutoModelForImageTextToText`): Qwen2.5-VL (the paper's), Qwen3-VL and Qwen3.5 run the same stages;
what differs between them for loading is in MODEL_FAMILIES.
"""

import dataclasses
import json
import os

import torch

# ----------------------------------------------------------------------------------------------
# Model families: what differs between the architectures, by the config's model_type. Everything else
# is shared: the image token and its vision_start/end frame, the prompt's layout (image before the
# question), positions from the model's own get_rope_index (M-RoPE: 3-D for image tokens), the
# processor's tensors. Two pieces live where they act: the recurrent state of Qwen3.5's linear-attention
# layers in the fast rollout's cache (rollout.py reads the config's layer_types), and Qwen3.5's think
# block, closed empty in every prompt (dataset.PROMPT_OPTIONS: the paper's format writes its own tags).

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    """what users call it"""
    lora_targets: tuple
    """the language model's linear layers that get LoRA adapters (names inside model.language_model)"""
    vision: str = "model.visual"
    """the vision tower with its merger (the projector): frozen, and left unquantised under 4-bit"""
    fast_rollout: bool = True
    """rollout.fast_generate's decoding loop is tested on it (greedy equal to HF generate)"""


MODEL_FAMILIES = {
    "qwen2_5_vl": Family("Qwen2.5-VL", _ATTENTION + _MLP),
    # DeepStack adds vision features to the first decoder layers' image tokens: inside the prefill only
    "qwen3_vl": Family("Qwen3-VL", _ATTENTION + _MLP),
    # three gated-delta-net layers in four: their input projections (q, k, v together; the output gate z)
    # and output take adapters; in_proj_a/b (one number per head) stay as they are
    "qwen3_5": Family("Qwen3.5", _ATTENTION + _MLP + ("in_proj_qkv", "in_proj_z", "out_proj")),
}


def family_of(config):
    """The Family of a model's config (or a model); one with the usual Qwen names, not tested, for a
    model_type the table does not list (fast rollouts then decline it)."""
    config = getattr(config, "config", config)
    kind = getattr(config, "model_type", None)
    return MODEL_FAMILIES.get(kind) or Family(f"{kind} (untested)", _ATTENTION + _MLP, fast_rollout=False)


def is_toy_dir(path) -> bool:
    return os.path.isfile(os.path.join(str(path), "toy_processor.json"))


def load_processor(path):
    """The toy processor for toy checkpoints, `AutoProcessor` for everything else (the real models)."""
    if is_toy_dir(path):
        from toy import ToyProcessor

        return ToyProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)  # no trust_remote_code: the families are built in
    processor.tokenizer.padding_side = "left"
    return processor


def lora_targets(family):
    """peft's target_modules: the family's linear layers, in the language model only (not the vision tower).
    Example: lora_targets(Family("x", ("q_proj", "v_proj"))) == r".*language_model.*\\.(q_proj|v_proj)"
    """
    return r".*language_model.*\.(" + "|".join(family.lora_targets) + ")"


LORA_TARGETS = lora_targets(MODEL_FAMILIES["qwen2_5_vl"])  # the paper's model's (bench/trl_vs_ours.py)


def load_policy(model_path, *, dtype="auto", load_in_4bit=False, lora_r=0, lora_alpha=None,
                lora_dropout=0.05, freeze_vision=True, gradient_checkpointing=False, device=None,
                adapter_path=None):
    """Load (model, processor) from a local directory or hub id.

    dtype: "auto" = bf16 on a GPU, fp32 on a CPU; or "bfloat16" / "float16" / "float32".
    load_in_4bit: bitsandbytes nf4 weights with bf16 compute, all frozen (QLoRA: add lora_r > 0 to train).
    lora_r > 0: LoRA adapters (peft) on the language model's linear layers only (MODEL_FAMILIES).
    freeze_vision: the vision tower and projector get no gradient (the paper freezes them).
    adapter_path: load a saved LoRA adapter on top of `model_path` (trainable if lora_r > 0).
    lora_dropout: of new adapters and of a loaded one (RL uses 0: the sampler runs without dropout, so
    the policy the update differentiates must too).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    family = family_of(AutoConfig.from_pretrained(model_path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        bf16 = device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device != "cpu" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
            # Patterns match module names from the start or as a suffix: "visual" alone matches nothing.
            llm_int8_skip_modules=[family.vision, "lm_head"])
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    # Qwen2.5-VL-Instruct's generation_config.json asks for repetition_penalty 1.05: GRPO's ratios assume
    # the samples come from plain softmax(logits / T), and the paper's evaluation decodes greedily.
    model.generation_config.repetition_penalty = 1.0
    if not load_in_4bit:
        model.to(device)
    if freeze_vision:
        for p in model.get_submodule(family.vision).parameters():  # vision tower + its merger (the projector)
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if load_in_4bit:
        _fix_bnb_cpu(model)
        for p in model.parameters():  # a 4-bit model trains only through adapters: norms, embeddings frozen
            p.requires_grad_(False)
    if adapter_path or lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_path:
            config = LoraConfig.from_pretrained(adapter_path)
            config.lora_dropout = lora_dropout  # as asked now, not as the adapter was trained
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=lora_r > 0, config=config)
        else:
            model = get_peft_model(model, LoraConfig(
                r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=lora_dropout,
                target_modules=lora_targets(family), task_type="CAUSAL_LM"))
    return model, load_processor(model_path)


def _fix_bnb_cpu(model):
    # bitsandbytes 0.50 repacks 4-bit weights for avx512_bf16 CPUs on an eval-mode forward, which
    # breaks a later training backward; turning that optimisation off keeps CPU QLoRA trainable.
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def unwrap(model):
    """The model under a DDP wrapper (`.module`); a peft model stays a peft model."""
    return getattr(model, "module", model)


def save_model(model, processor, path, merge_lora=False):
    """Save weights as safetensors + processor, loadable by `load_policy`. LoRA: the adapter, and a
    merged full copy under `path/merged` when `merge_lora`."""
    model = unwrap(model)
    os.makedirs(path, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)  # adapter_model.safetensors + adapter_config.json
        base = model.get_base_model()
        base.config.save_pretrained(path)
        processor.save_pretrained(path)
        if merge_lora:
            merged = model.merge_and_unload() if not getattr(base, "is_loaded_in_4bit", False) else None
            if merged is None:
                raise ValueError("--merge_lora needs unquantised base weights; reload the base in bf16 to "
                                 "merge")
            merged.save_pretrained(os.path.join(path, "merged"), safe_serialization=True)
            processor.save_pretrained(os.path.join(path, "merged"))
    else:
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)


def resolve_model(path):
    """(base path, adapter path or None): a LoRA output directory names its base in adapter_config.json."""
    cfg = os.path.join(str(path), "adapter_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f)["base_model_name_or_path"], str(path)
    return str(path), None


# ----------------------------------------------------------------------------------------------
# Log-probabilities of chosen tokens without a second copy of the logits


class SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T)[token] for every row of (N, V) logits, holding the logits only once.

    A plain `log_softmax(logits.float() / T).gather(...)` makes fp32 copies of the whole (N, V) tensor
    and keeps one for the backward: at 7B (vocabulary 152,064) and 2,048 tokens that is 1.2 GB per
    sequence per copy. Here the forward runs over chunks of rows, each upcast to fp32 on its own, and
    keeps only the logsumexp (N,); the backward writes the gradient, (onehot - softmax) / T, into the
    logits' own memory, which nothing reads after this function.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk):
        picked = torch.empty(len(logits), device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(picked)
        for s in range(0, len(logits), chunk):
            x = logits[s:s + chunk].float() / temperature  # (chunk, V) in fp32
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            picked[s:s + chunk] = x.gather(-1, tokens[s:s + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        for s in range(0, len(logits), chunk):
            g = grad[s:s + chunk, None].float() / T  # (chunk, 1)
            p = torch.exp(logits[s:s + chunk].float() / T - lse[s:s + chunk, None])  # softmax(logits / T)
            d = (-p * g).scatter_add_(-1, tokens[s:s + chunk, None], g)  # d logp / d logits, times grad
            logits[s:s + chunk] = d.to(logits.dtype)  # in place: the logits are not needed any more
        return logits, None, None, None


def selective_log_softmax(logits, tokens, temperature=1.0, chunk_bytes=2 ** 26):
    """log softmax(logits / T) at `tokens`, in fp32: (..., V), (...) -> (...). The logits must not be used
    by anything else afterwards (the backward overwrites them with their gradient).

    Example: selective_log_softmax(torch.tensor([[0., 0.]]), torch.tensor([1])) == tensor([-0.6931])
    """
    V = logits.shape[-1]
    if logits.is_leaf and logits.requires_grad:  # a leaf's own values must survive the backward
        logits = logits.clone()
    chunk = max(1, chunk_bytes // (4 * V))  # rows per fp32 chunk (64 MB)
    out = SelectiveLogSoftmax.apply(logits.reshape(-1, V), tokens.reshape(-1), float(temperature), chunk)
    return out.view(tokens.shape)
