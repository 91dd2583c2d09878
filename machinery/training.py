"""What 02 (SFT) and 03 (GRPO) share: the accelerator, the policy and its optimizer and schedule,
resumable checkpoints, the saved model, and the metric plots.

Distribution is accelerate's: one process, DDP, DeepSpeed ZeRO-2/3 or FSDP from the same code
(configs/*.yaml). A checkpoint is accelerate's `save_state` for every kind of run, so the path the
CPU tests exercise is the one a cluster uses.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil

import torch

from machinery import cli, dataset, policy


@dataclasses.dataclass
class TrainArgs:
    """The flags 02 and 03 share; each script sets its own defaults (the paper's, scaled to the toy)."""

    model: str = "toy/base_model"
    """policy to train: a local directory or hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct); a LoRA output
    directory works too"""
    out_dir: str = "runs/toy/run"
    """where the model, metrics.jsonl, plots and checkpoint/ go"""
    seed: int = 0
    """random seed"""
    lr: float = 1e-5
    """peak AdamW learning rate"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """share of the optimizer steps spent on linear warm-up before the cosine decay"""
    min_lr_ratio: float = 0.0
    """the cosine decays to this fraction of lr"""
    grad_clip: float = 1.0
    """gradient clipping by global norm"""
    lora_r: int = 0
    """LoRA rank on the language model's linear layers; 0 = full fine-tuning (16 with --load_in_4bit)"""
    lora_alpha: int = 0
    """LoRA alpha; 0 = 2 x lora_r"""
    load_in_4bit: bool = False
    """QLoRA: frozen nf4 base weights (bitsandbytes), bf16 compute on a GPU; implies LoRA (r 16 unless set)"""
    freeze_vision: bool = True
    """keep the vision tower and projector frozen (paper)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""
    cpu: bool = False
    """train on the CPU even if a GPU is present (with several processes: gloo)"""
    save_dtype: str = "auto"
    """dtype of the saved full model: 'auto' = bf16 after bf16-autocast training on a GPU (fp32 masters
    were for the updates), else as trained; 'float32', 'bfloat16' or 'float16'. LoRA adapters and
    ZeRO/FSDP runs save what they train"""
    save_every: int = 50
    """write out_dir/checkpoint every this many optimizer steps; 0 = never"""
    resume: bool = False
    """continue from out_dir/checkpoint: rerun the same command with --resume"""
    stop_after: int = 0
    """end this run after this many steps as if killed (tests --resume); 0 = run to the end"""
    report_to: str = "none"
    """also log metrics to 'tensorboard' or 'wandb' (through accelerate; installed separately); 'none' =
    metrics.jsonl and the PNG plots only"""


TRACKERS = ("none", "tensorboard", "wandb")


def check_train_args(args):
    """The shared flags' values, checked before any model loads."""
    cli.check_choice("save_dtype", args.save_dtype, SAVE_DTYPES)
    cli.check_choice("report_to", args.report_to, TRACKERS)
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:  # accelerate only warns
        raise cli.UserError(f"--report_to {args.report_to}: the package is not installed "
                            f"(pip install {args.report_to})")
    for flag in ("lr", "grad_clip"):
        if not getattr(args, flag) > 0:
            raise cli.UserError(f"--{flag} must be > 0; got {getattr(args, flag)}")
    if not 0 <= args.warmup_ratio < 1:
        raise cli.UserError(f"--warmup_ratio must be in [0, 1); got {args.warmup_ratio}")


def make_accelerator(args, grad_accum=1):
    """bf16 autocast on a GPU (fp16 where bf16 is missing), fp32 on the CPU (several processes: gloo);
    ZeRO/FSDP come from `accelerate launch --config_file configs/*.yaml`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, parse_flag_from_env

    on_gpu = torch.cuda.is_available() and not (args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    half = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "no"
    # an unfrozen vision tower gets no gradient from text-only batches: let DDP allow that
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=not args.freeze_vision)]
    # accelerate's cpu=True silently turns a DeepSpeed config into plain multi-CPU data parallel;
    # DeepSpeed itself runs on CPUs when accelerate leaves it the device and gets gloo to talk over
    deepspeed_on_cpu = not on_gpu and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if deepspeed_on_cpu:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=not on_gpu and not deepspeed_on_cpu, mixed_precision=half, gradient_accumulation_steps=grad_accum,
        kwargs_handlers=handlers,
        log_with=None if args.report_to == "none" else args.report_to, project_dir=args.out_dir)
    if not on_gpu and parse_flag_from_env("SRPO_TEST_FSDP_ON_CPU") and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        fsdp_on_cpu_for_tests(accelerator)
    keep_trainable_in_checkpoints(accelerator)
    return accelerator


def fsdp_on_cpu_for_tests(accelerator):
    """TEST-ONLY (SRPO_TEST_FSDP_ON_CPU=1 with an FSDP accelerate config, no GPU): turn the gloo
    multi-CPU run into a real FSDP one, so that tests/test_sharded.py shards on CPU processes.

    accelerate (1.15, pinned) switches to FSDP only from GPU-like devices and offers no supported way
    to choose it on a CPU; this sets its internal state as that switch would (the plugin reads the
    config from the environment accelerate launch set). It relies on accelerate's internals: not for
    real runs, which get FSDP from accelerate itself on their GPUs.
    """
    from accelerate import DistributedType
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        return
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def load_trainable_policy(args, accelerator, lora_r, lora_dropout=0.05):
    """(model, processor) for training: fp32 masters for full fine-tuning, the autocast dtype for a
    frozen base (training_dtype); a LoRA directory as --model loads its adapter on its base."""
    base, adapter = policy.resolve_model(args.model)
    return policy.load_policy(
        base, dtype=training_dtype(accelerator, frozen_base=bool(lora_r)), adapter_path=adapter,
        lora_r=lora_r, lora_alpha=args.lora_alpha or None, lora_dropout=lora_dropout, load_in_4bit=args.load_in_4bit,
        freeze_vision=args.freeze_vision,
        gradient_checkpointing=args.gradient_checkpointing, device=str(accelerator.device))


def numel(p):
    """A parameter's elements, also under ZeRO-3 with zero3_init_flag, where each process holds a
    partition and p.numel() is 0."""
    return getattr(p, "ds_numel", p.numel())


def describe_trainable(model, args, accelerator, lora_r, log=print):
    """Log what trains (parameters, LoRA or full, dtype, distribution) and return the trainable count;
    a model with nothing to train is a UserError."""
    n_train = sum(numel(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(numel(p) for p in model.parameters())
    if not n_train:
        raise cli.UserError(f"{args.model}: nothing to train (a LoRA adapter as --model needs --lora_r > 0)")
    kind = f"LoRA r={lora_r}" if lora_r else "full fine-tuning"
    log(f"{args.model}: {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters trainable "
        f"({'QLoRA nf4, ' if args.load_in_4bit else ''}{kind}, vision {'frozen' if args.freeze_vision else 'trained'}, "
        f"{training_dtype(accelerator, frozen_base=bool(lora_r))} weights, {accelerator.mixed_precision} autocast, "
        f"{accelerator.distributed_type.value} x {accelerator.num_processes})")
    return n_train


def memory_estimate(model, accelerator, **shape):
    """memory_parts for this model and accelerator (its precision, processes, ZeRO stage or FSDP), printed
    before the first step so a recipe that cannot fit is seen at once. `shape`: see memory_parts."""
    from accelerate import DistributedType

    model = accelerator.unwrap_model(model)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    params = list(model.parameters())
    return memory_parts(
        model.config.get_text_config(decoder=True), weight_bytes=sum(numel(p) * p.element_size() for p in params),
        n_train=sum(numel(p) for p in params if p.requires_grad),
        act_bytes=2 if accelerator.mixed_precision in ("bf16", "fp16") else 4, world=accelerator.num_processes,
        zero=accelerator.state.deepspeed_plugin.zero_stage if deepspeed else 0,
        fsdp=accelerator.distributed_type == DistributedType.FSDP, **shape)


def memory_parts(text, *, weight_bytes, n_train, act_bytes, world, zero, fsdp, sequences, prompt_len, new_tokens,
                 micro_batch, checkpointing, gathered_rollout=False):
    """A rough per-process peak of a training step in GB, by part. text: the text model's config;
    weight_bytes: all weights as loaded (4-bit: as packed); n_train: trainable parameters; sequences: rows in
    one rollout's KV cache (0: no rollout); prompt_len + new_tokens: a sequence; micro_batch: rows per
    forward/backward.

    Weights, and per trainable parameter a gradient and AdamW's two fp32 states (+ an fp32 master under
    DeepSpeed), split over the processes where ZeRO/FSDP shard them; the whole model gathered for a
    rollout (ZeRO-3/FSDP with --rollout fast); the rollout's KV cache; the logits of one micro-batch (at
    the new tokens only) and three 64 MB fp32 chunks; the activations one micro-batch keeps for the
    backward: ~24 hidden-sized tensors per token and layer (Qwen's MLP is 5.3x hidden), or with
    checkpointing one per layer plus one layer's worth.
    """
    sharded_weights = zero == 3 or fsdp
    L = prompt_len + new_tokens
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_layer = micro_batch * L * text.hidden_size * act_bytes
    parts = {
        "weights": weight_bytes / (world if sharded_weights else 1),
        "grads+AdamW": n_train * (12 + (4 if zero else 0)) / (world if zero >= 2 or fsdp else 1),
        "rollout KV cache": sequences * L * text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * act_bytes,
        "logits": micro_batch * new_tokens * text.vocab_size * act_bytes + 3 * 2 ** 26,
        "activations": per_layer * (text.num_hidden_layers + 24 if checkpointing else 24 * text.num_hidden_layers),
    }
    if gathered_rollout and sharded_weights:
        parts["gathered for the rollout"] = weight_bytes
    return {k: v / 1e9 for k, v in parts.items()}


def memory_line(parts):
    return ("memory estimate per process (GB): " + " + ".join(f"{k} {v:.1f}" for k, v in parts.items())
            + f" = {sum(parts.values()):.1f}")


def make_optimizer(args, model, total_steps):
    """AdamW on the trainable parameters, linear warm-up then cosine decay over `total_steps` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps,
                                min_ratio=args.min_lr_ratio)
    return optimizer, scheduler


def find_resume(args):
    """The checkpoint --resume continues from, or None (also when there is none yet)."""
    return find_checkpoint(os.path.join(args.out_dir, "checkpoint")) if args.resume else None


def start_or_resume(accelerator, args, found, *, scheduler, logs=("metrics.jsonl",)):
    """(step, extra). Resuming: the prepared model and optimizer, the schedule and the RNG states come
    back from `found`, and the rows of `logs` written after it (steps that will be redone) are dropped. A
    fresh start removes an earlier run's logs and checkpoint in out_dir."""
    if found:
        step, extra = load_checkpoint(accelerator, found, scheduler=scheduler)
        accelerator.print(f"resumed from {found} at step {step}")
        if accelerator.is_main_process:
            for name in logs:
                path = os.path.join(args.out_dir, name)
                rows = [r for r in dataset.read_jsonl(path) if r.get("step", 0) <= step]
                if os.path.exists(path):
                    with open(path, "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in rows)
        return step, extra
    if args.resume:
        accelerator.print(f"--resume: no checkpoint in {args.out_dir}, starting from scratch")
    if accelerator.is_main_process:
        for name in logs:
            path = os.path.join(args.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        remove_checkpoint(os.path.join(args.out_dir, "checkpoint"))
    return 0, {}


def start_trackers(accelerator, args, name):
    """--report_to: tensorboard or wandb beside metrics.jsonl (log rows with accelerator.log)."""
    if args.report_to != "none":
        config = {k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(name, config=config)


def training_dtype(accelerator, frozen_base):
    """Weights dtype for training: fp32 master weights for full fine-tuning (at lr 1e-6, bf16 weights
    would round most updates away), also on a GPU where the passes run under bf16 autocast. A frozen
    base (LoRA: peft keeps the adapters in fp32) and DeepSpeed (it keeps its own fp32 masters) load
    in the autocast dtype on a GPU."""
    from accelerate import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.device.type == "cuda" and (frozen_base or deepspeed):
        return {"bf16": "bfloat16", "fp16": "float16"}[accelerator.mixed_precision]
    return "float32"


def is_sharded(accelerator) -> bool:
    """ZeRO (DeepSpeed) or FSDP: no process holds the whole model and optimizer state."""
    from accelerate import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def weights_sharded(accelerator) -> bool:
    """ZeRO-3 or FSDP: each process holds only a shard of the weights, so every forward pass is a
    collective that all processes must join (generation: RolloutWeights)."""
    from accelerate import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


class RolloutWeights:
    """The policy one rollout samples from, held by the caller for a `with` block and released at its end:

        with training.RolloutWeights(accelerator, model, gather=True) as weights:
            rollout.generate(weights.model, ..., synced_gpus=weights.synced_gpus)

    ZeRO-3 or FSDP, where each process holds a shard of the weights:
      gather=True: on entry every process all-gathers the whole model once, in the dtype it trains in
        (2 bytes x parameters in bf16), and generates alone on it with no collective per token, so
        the fast path (rollout.fast_generate) applies; on exit the full copy is freed and the weights
        are shards again, before the update needs the memory.
      gather=False: no extra memory; each layer is gathered inside every forward pass, so all
        processes step together until the longest rollout ends (synced_gpus, HF generate).
    Anything else (one process, DDP, ZeRO-2): the model as it is.
    """

    def __init__(self, accelerator, model, gather):
        self.accelerator, self.wrapped, self.gather = accelerator, model, gather
        self.model = accelerator.unwrap_model(model)
        self.synced_gpus = None
        self._release = contextlib.ExitStack()

    def __enter__(self):
        from accelerate import DistributedType

        if not weights_sharded(self.accelerator):
            return self
        fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if fsdp and not self.accelerator.is_fsdp2:  # FSDP1 (not configs/fsdp.yaml): HF generate, in step
            self.synced_gpus = True
            return self
        if fsdp:
            self._fsdp_lazy_init()
        if not self.gather:
            self.synced_gpus = True
            if fsdp:
                self._fsdp_gather([self.model])  # the root's own weights: the vision tower's patch embedding
            return self
        if fsdp:
            from torch.distributed.fsdp import FSDPModule

            self._fsdp_gather([m for m in self.model.modules() if isinstance(m, FSDPModule)])
        else:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            # DeepSpeed's own: GatheredParameters over every weight, its fetch/release hooks off meanwhile
            self._release.enter_context(unwrap_model_for_generation(self.wrapped))
        return self

    def __exit__(self, *exc):
        return self._release.__exit__(*exc)

    def _fsdp_lazy_init(self):
        """FSDP sets itself up on the root module's first forward pass; generate can call a submodule
        first (transformers runs the vision tower from generate, outside the model's forward), which
        would then pass for the root. A one-token pass through the whole model (all processes) first."""
        state = self.model._get_fsdp_state()
        if state._is_root is None:
            with torch.no_grad():
                self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.accelerator.device))

    def _fsdp_gather(self, modules):
        """Unshard `modules` and keep them whole through every forward pass until exit, then reshard
        them and give back each FSDP unit its reshard-after-forward setting (accelerate chooses it per
        unit; torch 2.13, pinned, has no public getter, hence the param groups' own field)."""
        groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
        saved = [(g, g.post_forward_mesh_info) for g in groups]

        def release():
            for m in modules:
                m.reshard()
            for g, info in saved:
                g.post_forward_mesh_info = info

        self._release.callback(release)
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()


def prepare_deepspeed(accelerator, model, micro_batch, grad_clip):
    """DeepSpeed wants its per-GPU micro-batch before `prepare` (which gets no dataloader here), and
    clips gradients with its own config's value: say so when it differs from ours."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    # ZeRO-3 keeps weights below this many elements whole on every process; DeepSpeed's default
    # (100,000) would keep every weight of a small model whole. accelerate's rule for "auto" instead:
    # 10 x hidden size (Qwen2.5-VL-7B: 35,840; either way only norms and biases stay whole there).
    hidden = policy.unwrap(model).config.get_text_config(decoder=True).hidden_size
    config.setdefault("zero_optimization", {}).setdefault("stage3_param_persistence_threshold", 10 * hidden)
    clip = config.get("gradient_clipping")
    if clip in (None, "auto"):  # unset: ours (DeepSpeed would not clip; accelerate would fill in 1.0)
        config["gradient_clipping"] = grad_clip
    elif float(clip) != grad_clip:
        accelerator.print(f"note: DeepSpeed clips gradients at {clip} (its config's gradient_clipping), "
                          f"not at {grad_clip}")


# ----------------------------------------------------------------------------------------------
# Checkpoints for --resume: accelerate's save_state for every kind of run


def save_checkpoint(accelerator, path, *, scheduler, step, extra=None):
    """Everything --resume needs; every process calls it. accelerate writes the weights (safetensors),
    the optimizer and every process's RNG states (ZeRO/FSDP: each process its shard); we add
    trainer_state.json with the step, the schedule's position and `extra` (no pickle of ours).

    Written to `path.tmp` and swapped in when complete, so a crash while saving leaves the previous
    checkpoint whole. Unsharded runs save the trainable weights only (keep_trainable_in_checkpoints):
    the frozen ones (a 4-bit base, the vision tower) come from --model again.
    """
    tmp = path.rstrip("/") + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its files (its RNG state, its shard)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict(), "extra": extra or {}}, f)
        swap_in(tmp, path)  # only once it is complete
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, *, scheduler):
    """Restore what save_checkpoint wrote into the prepared model and optimizer; returns (step, extra)."""
    # strict=False: an unsharded checkpoint holds only the trainable weights (checked by the hook)
    accelerator.load_state(path, **({} if is_sharded(accelerator) else {"strict": False}))
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["extra"]


def keep_trainable_in_checkpoints(accelerator):
    """Make save_state write only the parameters that train (LoRA: the adapters, MBs instead of the
    whole base), and load_state check that a checkpoint has all of them. Sharded runs: unchanged."""
    from safetensors import safe_open

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = trainable(model)
            for name in [k for k in state if k not in keep]:
                del state[name]

    def on_load(models, input_dir):
        for i, model in enumerate(models):
            file = os.path.join(input_dir, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not os.path.isfile(file):
                continue  # sharded formats: their own loaders check
            with safe_open(file, "pt") as f:
                missing = trainable(model) - set(f.keys())
            if missing:
                raise cli.UserError(f"{input_dir}: the checkpoint lacks {len(missing)} trainable weights "
                                    f"(e.g. {sorted(missing)[0]}): written with another --lora_r or model?")

    if not is_sharded(accelerator):
        accelerator.register_save_state_pre_hook(on_save)
        accelerator.register_load_state_pre_hook(on_load)


def swap_in(tmp, path):
    """Replace folder `path` by the complete folder `tmp`. The old one is renamed aside first, so at
    every moment one whole checkpoint exists under `path` or `path.old` (see find_checkpoint)."""
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """`path` if it holds a checkpoint, else the `path.old` a crash inside swap_in left, else None."""
    for p in (path, path.rstrip("/") + ".old"):
        if os.path.isdir(p):
            return p
    return None


def remove_checkpoint(path):
    """Delete the checkpoint at `path` and any `path.old` beside it (a fresh run starts clean)."""
    for p in (path, path.rstrip("/") + ".old"):
        shutil.rmtree(p, ignore_errors=True)


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_save_dtype(name):
    """Fail at the start of a run, not after it, on a --save_dtype that save_final cannot use."""
    if name not in SAVE_DTYPES:
        raise cli.UserError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}; got {name!r}")


def save_final(accelerator, model, processor, out_dir, *, sharded=False, merge_lora=False, dtype="auto"):
    """The trained model as safetensors in out_dir; every process calls it. Sharded: the full state
    dict is gathered first (a collective), then the main process writes it.

    dtype (full fine-tuning, not sharded): 'auto' = bf16 after a bf16-autocast run, whose fp32 master
    weights were there for the updates only (half the disk; what the paper's checkpoints are), else
    as trained; or 'float32' / 'bfloat16' / 'float16'. The model is cast in place: call this when
    training is done. Sharded runs save what they gather (ZeRO: its bf16 weights; FSDP: fp32).
    """
    from accelerate import DistributedType

    if not sharded:
        dtype = (torch.bfloat16 if accelerator.mixed_precision == "bf16" else None) if dtype == "auto" else \
            getattr(torch, dtype)
        full = not hasattr(accelerator.unwrap_model(model), "peft_config")  # full fine-tuning
        if dtype is not None and full:
            accelerator.unwrap_model(model).to(dtype)
        if accelerator.is_main_process:
            policy.save_model(accelerator.unwrap_model(model), processor, out_dir, merge_lora=merge_lora)
    else:
        if merge_lora:
            accelerator.print("--merge_lora is not supported under ZeRO/FSDP; merge the saved adapter "
                              "afterwards")
        state_dict = accelerator.get_state_dict(model)  # ZeRO-3: None on all processes but the main one
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                # Loaded under ZeRO-3 (zero3_init_flag), the model records every legacy renaming of
                # transformers (5.24) as used, and save_pretrained would undo them all into names no
                # other loader reads (model.model.layers...); without the record it writes the names
                # a plain load and save write
                unwrapped.__dict__.pop("_weight_conversions", None)
            unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            processor.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


def cosine_schedule(optimizer, warmup_steps, total_steps, min_ratio=0.0):
    """Linear warm-up then cosine decay to `min_ratio` x lr."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def plot_metrics(rows, keys, path, title=""):
    """Line plot of `keys` against `step` from metric rows; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
