"""The model families the toy builds: Qwen2.5-VL, Qwen3-VL and Qwen3.5, one entry each in TOY_FAMILIES (by
the config's model_type; what differs when loading and training any checkpoint of them is in
machinery/policy.py: MODEL_FAMILIES).

What a family changes on the toy's side, and nothing else:
  * the image processor's settings, as the family's released processor has them (Qwen2.5-VL: 14-px
    patches, CLIP's mean/std; Qwen3-VL and Qwen3.5: 16-px patches, mean/std 0.5). The pixel budget is
    the toy's own, so that the toy's 112x112 picture is 16 image tokens in every family (the released
    Qwen3-VL processor scales any image up to at least 256x256 pixels);
  * its chat template, trimmed to what the stages use (system/user/assistant, text and image parts).
    Qwen3.5's adds its thinking switch: the generation prompt opens a think block, or with
    enable_thinking=False closes an empty one (machinery/dataset.py asks for that: the paper's format
    writes its own <think> tags);
  * the tiny random-weight model, built from the family's own config class (the real architecture):
    Qwen3-VL with interleaved M-RoPE and DeepStack (vision features added to the first decoder layers),
    Qwen3.5 with three gated-delta-net (linear attention) layers to one full-attention layer.

The tokenizer is the same for every family (toy/model.py: build_tokenizer); the special tokens the
families share (<|im_start|>, <|vision_start|>, <|image_pad|>, ...) keep their names.

    processor = toy.ToyProcessor.build(tokenizer, family="qwen3_vl")
    model = toy.build_tiny_model(tokenizer, family="qwen3_vl")   # from tiny_config("qwen3_vl", tokenizer)
"""

# Qwen2.5-VL's chat template, trimmed (Qwen3-VL-Instruct's renders the same text for these messages).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3.5's: the same turns; its generation prompt opens the model's think block unless asked not to.
CHAT_TEMPLATE_QWEN3_5 = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")

# The released processors' image settings (preprocessor_config.json); the toy sets its own pixel budget.
_QWEN2_5_IMAGES = dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
_QWEN3_IMAGES = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)

TOY_FAMILIES = {
    # model_type: (the name users know, image processor settings, chat template)
    "qwen2_5_vl": dict(name="Qwen2.5-VL", images=_QWEN2_5_IMAGES, chat_template=CHAT_TEMPLATE),
    "qwen3_vl": dict(name="Qwen3-VL", images=_QWEN3_IMAGES, chat_template=CHAT_TEMPLATE),
    "qwen3_5": dict(name="Qwen3.5", images=_QWEN3_IMAGES, chat_template=CHAT_TEMPLATE_QWEN3_5),
}


def check_family(family):
    if family not in TOY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}: one of {', '.join(TOY_FAMILIES)}")
    return family


def image_processor(family, image_size):
    """The family's image processor (the PIL one: the torchvision one does not import here) with a pixel
    budget that keeps an image_size x image_size picture at 16 image tokens: 112 px stays 112 with 14-px
    patches (2x2 merged: 28 px a token) and becomes 128 with 16-px patches (32 px a token)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = TOY_FAMILIES[check_family(family)]["images"]
    token = settings["patch_size"] * settings["merge_size"]  # pixels per image token, per side
    side = round(image_size / token) * token  # what the processor resizes image_size to
    return Qwen2VLImageProcessorPil(**settings, min_pixels=token * token, max_pixels=max(side, token) ** 2)


def _mrope_section(rotary_dim, ratio):
    """Split rotary_dim / 2 frequencies over (time, height, width) in the family's ratio; time takes the rest.
    Example: _mrope_section(32, (24, 20, 20)) == [6, 5, 5]"""
    half = rotary_dim // 2
    h = half * ratio[1] // sum(ratio)
    w = half * ratio[2] // sum(ratio)
    return [half - h - w, h, w]


def tiny_config(family, tokenizer, *, hidden=128, layers=4, vision_hidden=64, vision_depth=2):
    """The config of a tiny model of `family` (~1M parameters at the defaults) for the toy tokenizer."""
    from transformers import AutoConfig

    ids = tokenizer.convert_tokens_to_ids
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden, spatial_merge_size=2, temporal_patch_size=2,
                  patch_size=TOY_FAMILIES[check_family(family)]["images"]["patch_size"])
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                  tie_word_embeddings=True)
    if family == "qwen2_5_vl":
        # M-RoPE: the rotary half-dim in blocks of (time, height, width), 1/4 : 3/8 : 3/8 ([16, 24, 24] at 7B)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": _mrope_section(head_dim, (2, 3, 3))}
        vision.update(window_size=112, fullatt_block_indexes=[vision_depth - 1])
    elif family == "qwen3_vl":
        # Interleaved M-RoPE (t, h, w, t, h, w, ...) in 8B's 24 : 20 : 20; DeepStack: each listed vision layer's
        # merged features are added to the image tokens' hidden states after decoder layer 0, 1, ...
        text.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
            "mrope_section": _mrope_section(head_dim, (24, 20, 20))})
        vision.update(deepstack_visual_indexes=list(range(vision_depth)), num_position_embeddings=64)
    else:  # qwen3_5
        # Gated delta net layers (linear attention: a recurrent state, no KV cache) with one full-attention
        # layer in four, the last layer full in any case; the full-attention heads rotate a quarter of their
        # dimensions (interleaved M-RoPE)
        kinds = ["full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "linear_attention" for i in range(layers)]
        text.update(layer_types=kinds, head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, rope_parameters={
                        "rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                        "mrope_interleaved": True, "mrope_section": _mrope_section(head_dim // 4, (11, 11, 10))})
        vision.update(num_position_embeddings=64)
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, **tokens)
