"""Generation: the rollouts of GRPO and the answers of evaluation.

`generate` picks the fast path, a hand-written decoding loop on a static KV cache, where it applies
(`fast_path_support`), else HF `generate` (`hf_generate`, also `--rollout hf`).

Why a loop of our own: GRPO spends most of a step sampling, and `model.generate` pays for its generality
on every token:
a cache that is re-concatenated each step, logits processors and mask building in Python, and the prompt
(vision tower included) encoded once per sample although GRPO repeats each prompt G times. Here:
  - identical prompts are encoded once and their keys/values copied to their G rows;
  - the KV cache is allocated once for prompt + max_new_tokens (a static cache), so a decoding step
    always has the same shapes, and attention reads each key/value head once (no per-group copies);
  - on CUDA that step (model forward + sampling) is compiled into CUDA graphs (torch.compile,
    mode="reduce-overhead"): one graph replay per token. On a CPU it runs eagerly: compiling costs
    more start-up time per process than a toy run wins back, and it needs a C++ compiler
    (docs/performance.md has the figures).

Same semantics as hf_generate: plain softmax(logits / T) with top-p (no top-k), vision special tokens
suppressed, EOS blocked before min_new_tokens, pad after EOS, stop once every row has ended. Greedy output
is the same token for token; sampled tokens come from the same distribution (not the same random draws).

The families (policy.MODEL_FAMILIES) differ inside the model's forward, which the loop calls as it is: the
prefill gives Qwen3-VL's DeepStack features to its first layers (decoding steps carry no image). One
difference is the cache's: Qwen3.5's gated-delta-net layers (linear attention) keep no keys and values but
a fixed-size recurrent state and the last few inputs of a short convolution; the cache holds those beside
the full-attention layers' static keys and values, and the prefill copies them to a prompt's G rows alike.

    ids, mask, texts = generate(model, processor, batch, max_new_tokens=128, temperature=1.0)
"""

import contextlib
import math
import warnings
import weakref

import torch

from machinery import dataset, policy

# Cache lengths are rounded up to a multiple of this, so that prompts of slightly different lengths reuse
# one cache and one compiled graph instead of compiling again for every new length.
CACHE_BUCKET = 64
# On CUDA, checking "have all rows ended?" forces a host sync; doing it every few tokens keeps the GPU busy
# (the extra steps only add padding, which is trimmed off).
SYNC_EVERY_CUDA = 8
SUPPORTED_ATTENTION = ("sdpa", "eager")


def core_model(model):
    """The transformers model that runs the forward: under DDP (`.module`) and peft (LoRA layers stay in)."""
    model = policy.unwrap(model)
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _generation_config_extras(gen):
    """Settings in the model's generation_config that model.generate would add on top of hf_generate's
    arguments (e.g. Qwen's repetition_penalty) and that this loop does not implement."""
    cfg = getattr(gen, "generation_config", None)
    if cfg is None:
        return []
    neutral = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "sequence_bias": (None,), "min_length": (None, 0), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,),
               "begin_suppress_tokens": (None,), "guidance_scale": (None, 1.0),
               "remove_invalid_values": (None, False), "renormalize_logits": (None, False),
               "watermarking_config": (None,), "min_p": (None,), "typical_p": (None, 1.0),
               "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,)}
    return [f"{k}={getattr(cfg, k)!r}" for k, ok in neutral.items() if getattr(cfg, k, None) not in ok]


def fast_path_support(model, synced_gpus=False):
    """(True, what it will do) when fast_generate can replace hf_generate for this model, else
    (False, why not). Never raises."""
    if synced_gpus:
        return False, "weights are sharded across processes (synced_gpus): all ranks must step together"
    model = policy.unwrap(model)
    if type(model).__name__ == "FullyShardedDataParallel":
        return False, "FSDP-wrapped model"
    if hasattr(model, "peft_config"):
        kinds = {getattr(c.peft_type, "value", c.peft_type) for c in model.peft_config.values()}
        if kinds != {"LORA"}:
            return False, f"peft {sorted(map(str, kinds))}: only LoRA (its layers are inside the forward)"
    gen = core_model(model)
    if not policy.family_of(gen).fast_rollout:  # by the config: FSDP2 turns the class into a subclass of it
        tested = ", ".join(f.name for f in policy.MODEL_FAMILIES.values() if f.fast_rollout)
        return False, f"{type(gen).__name__}: the loop is tested on {tested} only"
    for p in gen.parameters():  # ZeRO-3 marks a weight AVAILABLE while it is gathered whole
        if getattr(getattr(p, "ds_status", None), "name", "AVAILABLE") != "AVAILABLE" or \
                type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return False, "partitioned weights (ZeRO-3 / FSDP; training.RolloutWeights gathers them)"
    devices = set(getattr(gen, "hf_device_map", {}).values())
    if len(devices) > 1:
        return False, f"model spread over several devices {sorted(map(str, devices))}"
    if gen.device.type == "meta":
        return False, "weights on the meta device"
    text = gen.config.get_text_config(decoder=True)
    if text._attn_implementation not in SUPPORTED_ATTENTION:
        return False, f"attention {text._attn_implementation!r}: the loop supports {SUPPORTED_ATTENTION}"
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        return False, "sliding-window attention layers"
    if gen.training and _checkpointing(gen):
        return False, "gradient checkpointing in train mode drops the KV cache (call model.eval() first)"
    extras = _generation_config_extras(gen)
    if extras:
        return False, "generation_config adds logits processors (generate applies them): " + ", ".join(extras)
    how = "compiled decode step" if _want_compile(None, gen.device) else "eager decode step"
    state = " + recurrent state" if "linear_attention" in _layer_types(text) else ""
    return True, f"static KV cache{state}, {how}" + (" (4-bit weights)" if _is_4bit(gen) else "")


def _layer_types(text):
    """Each decoder layer's kind: 'full_attention' (keys and values) or 'linear_attention' (Qwen3.5's gated
    delta net: a recurrent state)."""
    return getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers


def _checkpointing(gen):
    on = getattr(gen, "is_activation_checkpointing", None)  # the transformers 5 name
    return gen.is_gradient_checkpointing if on is None else on


def _is_4bit(gen):
    return bool(getattr(gen, "is_loaded_in_4bit", False))


def _want_compile(compile, device):
    """The torch.compile backend for the decode step, or None for eager. compile=None: "inductor" on CUDA,
    eager on a CPU, by measurement on the toy (module docstring); a string is a backend name (tests use
    "eager" to check that the step traces as one graph)."""
    if compile is None:
        compile = device.type == "cuda"
    if compile is True:
        return "inductor"
    return compile or None


def mrope_positions(gen, batch):
    """(4, B, L) position ids of a left-padded prompt, built as model.generate builds them
    (_prepare_position_ids_for_generation of Qwen2.5-VL, Qwen3-VL and Qwen3.5 alike).

    Row 0: the text position (count of real tokens so far), which the model only uses for masks. Rows 1-3:
    M-RoPE (temporal, height, width), from the model's own get_rope_index: an image's tokens get 2-D grid
    positions, so after an image the positions run ahead of or behind the token count, and decoding
    continues from the last one. (Qwen3's interleave the three over the frequencies; same positions.)
    """
    am = batch["attention_mask"]
    text = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)
    grids = {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    if batch.get("mm_token_type_ids") is not None and (grids["image_grid_thw"] is not None
                                                       or grids["video_grid_thw"] is not None):
        vision, _ = gen.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                             attention_mask=am, **grids)
    else:
        vision = text[None].expand(3, -1, -1)
    return torch.cat([text[None], vision.to(text.dtype)])


def top_p_filter(scores, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one); the
    others get -inf. Same rule as transformers' TopPLogitsWarper. (B, V) -> (B, V)"""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    drop = cum <= (1 - top_p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


def pick_tokens(logits, bias, temperature, top_p, want_logprobs):
    """Next tokens (B,) and, if wanted, their log-probabilities under the distribution they were drawn
    from (else None).

    logits: (B, V); bias: (V,) 0 or -inf (suppressed tokens, EOS before min_new_tokens). Greedy when
    temperature <= 0 (log-probs then at T = 1).
    """
    scores = logits.float() + bias
    if temperature <= 0:
        tokens = scores.argmax(-1)
        return tokens, (scores.amax(-1) - scores.logsumexp(-1) if want_logprobs else None)
    scores = scores / temperature
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    probs = scores.softmax(-1)
    # Inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, total) (one uniform per
    # row; an exponential or Gumbel per vocabulary entry costs more than the model's step on a CPU). A token
    # of probability 0 adds nothing to the sum, so it is never picked. Graph-capturable, unlike multinomial.
    cdf = probs.cumsum(-1)
    u = torch.rand_like(cdf[:, -1:]) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    # u can round up to the total (about once in 2^24 draws): then take the most likely token, never one
    # of probability 0 (a suppressed one).
    tokens = torch.where(probs.gather(-1, tokens[:, None]).squeeze(-1) > 0, tokens, probs.argmax(-1))
    return tokens, (probs.gather(-1, tokens[:, None]).squeeze(-1).log() if want_logprobs else None)


def repeated_rows(batch, vision_start_id):
    """(first, inverse): the rows that start a run of identical prompts (same tokens, same images), and for
    every row the index of its run. 03 repeats each prompt G times in a row (dataset.repeat_for_group)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    same = ((ids[1:] == ids[:-1]) & (am[1:] == am[:-1])).all(1).tolist()
    if "pixel_values" in batch and any(same):
        images = dataset.image_ranges(batch, vision_start_id)
        pixels, grids = batch["pixel_values"], batch["image_grid_thw"]
        for r in range(1, len(ids)):
            (i0, i1, p0, p1), (j0, j1, q0, q1) = images[r - 1], images[r]
            same[r - 1] = same[r - 1] and torch.equal(grids[i0:i1], grids[j0:j1]) and \
                torch.equal(pixels[p0:p1], pixels[q0:q1])
    first = [0] + [r for r in range(1, len(ids)) if not same[r - 1]]
    inverse = torch.tensor([0] + same, device=ids.device).logical_not().long().cumsum(0) - 1
    return first, inverse


def prefill(gen, batch, cache):
    """Run the prompts (images included) through the model once, into the static cache's first slots.
    Returns (next-token logits (B, V), prompt position ids (4, B, Lp)).

    Identical prompts are encoded once (GRPO samples each prompt G times): the vision tower and the prompt
    pass cost 1/G, and their keys and values are copied to the G rows. Transformers' usual dynamic cache
    here gives the same prefill numbers as model.generate.
    """
    first, inverse = repeated_rows(batch, gen.config.vision_start_token_id)
    if gen.training:  # dropout must differ between rows: no sharing
        first, inverse = list(range(len(inverse))), torch.arange(len(inverse), device=inverse.device)
    sub = dataset.select_rows(batch, first, gen.config.vision_start_token_id)
    positions = mrope_positions(gen, sub)
    out = gen(**sub, position_ids=positions, use_cache=True, logits_to_keep=1)
    copy_cache_rows(out.cache, cache, inverse)
    return out.logits[inverse, -1], positions[:, inverse]


def copy_cache_rows(src, dst, rows):
    """dst's row b <- src's row rows[b], layer by layer: an attention layer's keys and values into dst's first
    slots; a linear-attention layer's conv and recurrent states (its whole past, fixed-size) into dst's."""
    for i, layer in enumerate(src.layers):
        if hasattr(layer, "recurrent_states"):
            dst.update_conv_state(layer.conv_states[0][rows], i)
            dst.update_recurrent_state(layer.recurrent_states[0][rows], i)
        else:
            dst.update(layer.keys[rows], layer.values[rows], i)  # writes slots 0..Lp-1


def repeat_cache_rows(cache, rows):
    """A prompt pass's cache (P rows) turned, in place, into the cache its len(rows) continuations read, row b
    <- row rows[b], for a forward with gradients (03's prompt_shared_logprobs). Keys and values are indexed
    (the gradient flows back through the index). A linear-attention layer's states are indexed into a layer
    that replaces them when the continuation updates them: transformers' own copies the update into the old
    tensor in place, which the prompt pass's backward still needs."""
    from transformers.cache_utils import LinearAttentionLayer

    class Continuation(LinearAttentionLayer):
        def update_conv_state(self, conv_states, state_idx=0, **kwargs):
            full = torch.cat([self.conv_states[state_idx], conv_states], -1)  # the convolution's left context
            self.conv_states[state_idx] = full[..., -self.conv_kernel_size[state_idx]:]
            return full

        def update_recurrent_state(self, recurrent_states, state_idx=0, **kwargs):
            self.recurrent_states[state_idx] = recurrent_states
            return recurrent_states

    for i, layer in enumerate(cache.layers):
        if hasattr(layer, "recurrent_states"):
            new = Continuation()
            new.device, new.dtype, new.conv_kernel_size = layer.device, layer.dtype, dict(layer.conv_kernel_size)
            new.conv_states[0], new.recurrent_states[0] = layer.conv_states[0][rows], layer.recurrent_states[0][rows]
            new.is_conv_states_initialized[0] = new.is_recurrent_states_initialized[0] = True
            new.has_previous_state[0] = True
            cache.layers[i] = new
        else:  # (P, heads, Lp, d) -> (b, heads, Lp, d)
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def sdpa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for one new token per row that reads each key/value head once (grouped-query attention).

    The n_rep query heads that share a key/value head become n_rep query positions of that head (all may
    see the same slots, so the (B, 1, 1, S) mask broadcasts). transformers' own sdpa does this too, but not
    under torch.compile, where it repeats the whole cache n_rep times every step (7x for Qwen2.5-VL-7B).
    Same interface and output layout (B, 1, H, D) as transformers' attention functions.
    """
    B, H, q, D = query.shape
    Hk = key.shape[1]
    assert q == 1, "decode attention: one query token per row"
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, Hk, H // Hk, D), key, value, attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


DECODE_ATTENTION = "rollout_sdpa_decode"


@contextlib.contextmanager
def _decode_attention(gen):
    """Decoding steps use sdpa_decode_attention (registered with transformers under DECODE_ATTENTION);
    the prefill and every other forward keep the model's own. Eager attention is left as it is."""
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, sdpa_decode_attention)
    text = gen.config.get_text_config(decoder=True)
    before = text._attn_implementation
    if before == "sdpa":
        text._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        text._attn_implementation = before


def _live_static_layer():
    """A StaticLayer that hands attention only its first `live` slots. For eager decoding, where shapes
    may change: a CPU's attention reads every key it is given, and the unwritten tail of the cache is up to
    max_new_tokens long (a compiled step instead keeps the full length, so that its shapes never change)."""
    from transformers.cache_utils import StaticLayer

    class LiveStaticLayer(StaticLayer):
        live = None

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return (keys, values) if self.live is None else (keys[:, :, :self.live], values[:, :, :self.live])

    return LiveStaticLayer


class _Decoder:
    """One static KV cache and its decode step, for a (model, batch size, cache length): kept between calls
    because CUDA graphs replay on fixed memory addresses, so the cache must stay where it was captured."""

    def __init__(self, gen, key, cache_len, compile):
        from transformers import StaticCache
        from transformers.cache_utils import Cache

        self.model_ref, self.key = weakref.ref(gen), key
        text = gen.config.get_text_config(decoder=True)
        self.eager_mask = text._attn_implementation == "eager"
        self.mask_dtype = gen.dtype
        self.compiled, self.live_slicing = None, not compile
        if compile:
            self.cache = StaticCache(config=gen.config, max_cache_len=cache_len)  # per layer type, as below
            # reduce-overhead: CUDA graphs, one replay per token. fullgraph: a graph break would split the
            # step and the CUDA graph with it. dynamic=False: every step has the same shapes. bitsandbytes'
            # 4-bit layers trace as one graph too (bitsandbytes >= 0.45 registers its ops with torch).
            mode = "reduce-overhead" if gen.device.type == "cuda" and compile == "inductor" else None
            self.compiled = torch.compile(self.step, backend=compile, mode=mode, fullgraph=True,
                                          dynamic=False)
        else:
            from transformers.cache_utils import LinearAttentionLayer

            live = _live_static_layer()
            self.cache = Cache(layers=[LinearAttentionLayer() if kind == "linear_attention" else
                                       live(max_cache_len=cache_len) for kind in _layer_types(text)])

    def step(self, tokens, positions, kv_valid, bias, temperature, top_p, want_logprobs):
        """One token per row through the model: tokens (B, 1), positions (4, B, 1), kv_valid (B, S) which
        cache slots hold real tokens (this step's slot included). Returns (next tokens, their log-probs)."""
        # A 4-D mask is used as it is: no per-step mask building.
        mask = kv_valid[:, None, None, :]
        if self.eager_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.mask_dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.mask_dtype).min)
        out = self.model_ref()(input_ids=tokens, position_ids=positions, attention_mask=mask,
                               cache=self.cache, use_cache=True)
        return pick_tokens(out.logits[:, -1], bias, temperature, top_p, want_logprobs)

    def __call__(self, tokens, positions, kv_valid, *args):
        """kv_valid: (B, S) over the whole cache; eager steps see only its slots up to the last valid one."""
        if self.compiled is None:
            if self.live_slicing:
                live = int(kv_valid.any(0).nonzero().max()) + 1
                for layer in self.cache.layers:
                    if hasattr(layer, "live"):  # attention layers (a recurrent state has no length)
                        layer.live = live
                kv_valid = kv_valid[:, :live]
            return self.step(tokens, positions, kv_valid, *args)
        if tokens.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were copied out
        try:
            return self.compiled(tokens, positions, kv_valid, *args)
        except Exception as e:  # noqa: BLE001 (compilation can fail in many ways; tracing mutates nothing)
            warnings.warn(f"rollout: torch.compile failed, decoding eagerly ({type(e).__name__}: {e})")
            self.compiled = None
            return self.step(tokens, positions, kv_valid, *args)


_slot = None  # the last _Decoder: one policy model per process in 03, so one cache is enough


def _decoder(gen, batch_size, cache_len, compile):
    global _slot
    kind = gen.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    key = (batch_size, cache_len, str(gen.device), gen.dtype, autocast, compile)
    if _slot is None or _slot.model_ref() is not gen or _slot.key != key:
        _slot = None  # free the old cache before allocating the new one
        _slot = _Decoder(gen, key, cache_len, compile)
    else:
        _slot.cache.reset()
    return _slot


def release():
    """Free the kept KV cache (and compiled step), e.g. before a memory-hungry stage."""
    global _slot
    _slot = None


@torch.no_grad()
def fast_generate(model, processor, batch, *, max_new_tokens, temperature=0.0, top_p=1.0, min_new_tokens=None,
                  compile=None, return_logprobs=False):
    """hf_generate on a static KV cache. Returns (completion_ids (B, T), completion_mask (B, T), texts),
    plus the sampled tokens' log-probs (B, T) under the distribution they were drawn from if return_logprobs.

    compile: None = compile the decode step on CUDA only; True/False to force. Raises ValueError where
    fast_path_support declines.
    """
    ok, why = fast_path_support(model)
    if not ok:
        raise ValueError(f"fast_generate does not apply: {why}")
    if "pixel_values_videos" in batch:
        raise ValueError("fast_generate does not apply: videos (repeated rows share images only)")
    gen = core_model(model)
    device = gen.device
    batch = {k: v.to(device) for k, v in batch.items()}
    B, Lp = batch["input_ids"].shape
    S = -(-(Lp + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    dec = _decoder(gen, B, S, _want_compile(compile, device))
    pad = processor.tokenizer.pad_token_id

    V = gen.config.get_text_config(decoder=True).vocab_size
    is_eos = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos[eos_token_ids(processor)] = True
    bias = torch.zeros(V, device=device)
    bias[vision_token_ids(processor)] = -math.inf  # a sampled <|image_pad|> breaks the next forward
    bias_no_eos = bias.masked_fill(is_eos, -math.inf)  # before min_new_tokens

    # Which cache slots hold real tokens: the prompt's (not its left padding), then one more per step.
    kv_valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    kv_valid[:, :Lp] = batch["attention_mask"].bool()
    logits, positions = prefill(gen, batch, dec.cache)
    next_pos = positions[..., -1:] + 1  # (4, B, 1): decoding continues from the last prompt position

    ids = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    sync_every = SYNC_EVERY_CUDA if device.type == "cuda" else 1
    with _decode_attention(gen):
        for t in range(max_new_tokens):
            b = bias_no_eos if min_new_tokens and t < min_new_tokens else bias
            if t == 0:
                tok, logp = pick_tokens(logits, b, temperature, top_p, return_logprobs)
            else:
                kv_valid[:, Lp + t - 1] = True  # the slot the previous token is written to
                tok, logp = dec(tok[:, None], next_pos + (t - 1), kv_valid, b, temperature, top_p,
                                return_logprobs)
            tok = torch.where(running, tok, pad)  # rows that have ended get padding
            ids[:, t] = tok
            if return_logprobs:
                logps[:, t] = logp
            running &= ~is_eos[tok]
            if (t + 1) % sync_every == 0 and not running.any():
                break
    mask = completion_mask(ids, eos_token_ids(processor))
    # T = the longest completion, as generate returns it (steps after the last EOS only added padding).
    T = int(mask.sum(1).max())
    ids, mask, logps = ids[:, :T], mask[:, :T], logps[:, :T]
    texts = [processor.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask)]
    return (ids, mask, texts, logps) if return_logprobs else (ids, mask, texts)


# ----------------------------------------------------------------------------------------------
# HF generate, and the choice between the two


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
    none = torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), none)
    return (torch.arange(T, device=completion_ids.device)[None] <= first[:, None]).long()


@torch.no_grad()
def hf_generate(model, processor, batch, *, max_new_tokens, temperature=0.0, top_p=1.0, min_new_tokens=None,
             synced_gpus=None):
    """HF `generate`: sample (temperature > 0, plain softmax(logits / T) with top-p, no top-k) or decode
    greedily; the reference the fast path is tested against, and the fallback where it does not apply.

    Returns (completion_ids (B, T), completion_mask (B, T), texts). Vision special tokens are
    suppressed: a sampled <|image_pad|> would break the next forward pass with an image.
    """
    gen = policy.unwrap(model)
    eos = eos_token_ids(processor)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos,
                  pad_token_id=processor.tokenizer.pad_token_id,
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
    texts = [processor.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(completion, mask)]
    return completion, mask, texts


def generate_responses(model, processor, questions, images, *, system_prompt, max_new_tokens,
                       temperature=0.0, batch_size=8, desc="generate", rollout="hf"):
    """Answer many questions in batches (left-padded) with a progress bar. Returns the texts.
    `rollout` 'hf' by default: evaluation keeps HF generate, whose greedy answers the recorded results
    were measured with (the fast path's are the same token for token in the tests)."""
    from tqdm.auto import tqdm

    policy.unwrap(model).eval()
    texts = []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        batch = dataset.encode_prompts(processor, questions[i:i + batch_size], images[i:i + batch_size],
                                       system_prompt)
        texts += generate(model, processor, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                          rollout=rollout)[2]
    return texts


ROLLOUTS = ("fast", "hf")
_said = set()


def generate(model, processor, batch, *, max_new_tokens, temperature=0.0, top_p=1.0, min_new_tokens=None,
             synced_gpus=None, rollout="fast"):
    """The rollout: `fast_generate` where it applies (rollout='fast'), else HF `generate`; the choice
    and its reason are printed once per process. Returns (completion_ids (B, T), completion_mask (B, T),
    texts); vision special tokens are never sampled."""
    use_fast, why = (False, "rollout='hf' asked for") if rollout == "hf" else \
        fast_path_support(model, bool(synced_gpus))
    line = f"rollout: {'fast' if use_fast else 'HF generate'} ({why})"
    if line not in _said:
        _said.add(line)
        print(line, flush=True)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  min_new_tokens=min_new_tokens)
    if use_fast:
        return fast_generate(model, processor, batch, **kwargs)
    return hf_generate(model, processor, batch, synced_gpus=synced_gpus, **kwargs)
