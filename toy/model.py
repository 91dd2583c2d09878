"""The toy's model side: a byte-level BPE tokenizer trained here, a processor that gives the official
Qwen-VL processors' tensors, and a tiny model of the real architecture (Qwen2.5-VL by default; Qwen3-VL
and Qwen3.5 too, toy/families.py).

* `build_tokenizer()` - trained on the toy's own texts (questions, solutions, the check's words); every
  number the task writes is one token.
* `ToyProcessor` - `Qwen2_5_VLProcessor`'s (or `Qwen3VLProcessor`'s) outputs without their torchvision
  dependency.
* `build_tiny_model()` - ~1M parameters, randomly initialised (00_base_model.py trains it).
"""

import json
import os

from toy.families import CHAT_TEMPLATE, TOY_FAMILIES, check_family, image_processor, tiny_config
from toy.world import (FAMILIES, IMAGE_SIZE, MAX_ADDEND, MAX_DOTS, MAX_MULTIPLIER, STEP_CUE, TEST_SEED_OFFSET,
                       _steps_text, check_steps, check_task, cot_response, make_problem, oracle_reflection,
                       single_step_problem, solution_text)

# Qwen2.5-VL's special tokens, in Qwen's order; the reasoning tags are single (non-special) tokens.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _tokenizer_corpus(extra_texts=(), task="toy"):
    texts = list(extra_texts)
    for seed in range(3000):
        p = make_problem(TEST_SEED_OFFSET * 3 + seed, task)  # a seed range used by neither split
        sol = json.loads(p["solution"])
        if task == "toy":
            # Fixed strings, not oracle_reflection's: the corpus the shipped base's tokenizer was built from
            # (`make base` rebuilds the same tokenizer); every word a reflection writes is in it.
            steps = _steps_text(check_steps(sol["op"], sol["reads"][0][1], sol["m"], sol["c"]))
            texts += [p["question"], p["question"] + STEP_CUE, cot_response(p), cot_response(p, stepwise=True),
                      f"Check: {steps} The first answer is right.", f"Check: {steps} The first answer is wrong.",
                      *single_step_problem(TEST_SEED_OFFSET * 3 + seed)]
        else:
            texts += [p["question"], cot_response(p), oracle_reflection(p, "", False),
                      oracle_reflection(p, solution_text(sol["reads"], sol["op"]), True)]
    if task == "toy":  # every number the task can write, as one token with and without its space
        top = max(check_steps(op, MAX_DOTS, MAX_MULTIPLIER[op], MAX_ADDEND)[-1][-1] for op in FAMILIES)
        texts += [f"{i} = {i}. {i}" for i in range(top + 1) for _ in range(3)]
    else:
        texts += [str(i) for i in range(-20, 100)]
    return texts + list("ABCDEFGHIJ")


def build_tokenizer(extra_texts=(), vocab_size: int = 0, task: str = "toy"):
    """A byte-level BPE tokenizer trained on the corpus of toy `task` (+ `extra_texts`, e.g. system prompts).

    vocab_size 0 = the task's: 1536 for toy (every number up to 255 is one token, with and without its
    leading space), 1024 for toy-dots."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size or {"toy": 1536, "toy-dots": 1024}[check_task(task)], special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(extra_texts, check_task(task)), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


class ToyProcessor:
    """A processor for the toy model that returns exactly what `Qwen2_5_VLProcessor` returns (and
    `Qwen3VLProcessor`, which Qwen3-VL and Qwen3.5 use, with their image settings: toy/families.py).

    Why not the official one: it builds a video processor that needs torchvision, which does not
    import beside the CPU torch wheel used here. Real checkpoints load through `AutoProcessor`
    (see `policy.load_processor`); this class is only used for directories holding `toy_processor.json`.
    Outputs: `input_ids`, `attention_mask`, `pixel_values` (all images' patches, flat),
    `image_grid_thw` (one row per image) and `mm_token_type_ids` (1 at image tokens), without which
    transformers 5 silently falls back to 1-D positions instead of Qwen's 3-D M-RoPE.
    `task` is the toy task the model was built for ('toy' or 'toy-dots'), saved with it, so that
    quick checks of a toy model (machinery/scoring.py: check_toy) ask it the right kind of problem.
    """

    def __init__(self, tokenizer, image_processor, task="toy"):
        self.tokenizer, self.image_processor, self.task = tokenizer, image_processor, check_task(task)
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = tokenizer.chat_template

    @classmethod
    def build(cls, tokenizer, task="toy", family="qwen2_5_vl"):
        """The processor of a toy model of `family` (toy/families.py): its image settings, its chat template
        (set on `tokenizer`). A 112x112 image is 16 image tokens in every family."""
        tokenizer.chat_template = TOY_FAMILIES[check_family(family)]["chat_template"]
        return cls(tokenizer, image_processor(family, IMAGE_SIZE), task)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kw):
        return self.tokenizer.apply_chat_template(messages, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def __call__(self, text, images=None, padding=True, return_tensors="pt", padding_side=None, **kw):
        import torch
        from transformers import BatchFeature

        text = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            # Expand each <|image_pad|> to as many tokens as the image has merged patches.
            expanded = []
            for t in text:
                parts = t.split(self.image_token)
                s = parts[0]
                for p in parts[1:]:
                    s += self.image_token * next(counts) + p
                expanded.append(s)
            text = expanded
        enc = self.tokenizer(text, padding=padding, return_tensors=return_tensors,
                             padding_side=padding_side or self.tokenizer.padding_side, **kw)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.int64)
        return BatchFeature(out)

    def batch_decode(self, *args, **kw):
        return self.tokenizer.batch_decode(*args, **kw)

    def decode(self, *args, **kw):
        return self.tokenizer.decode(*args, **kw)

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, "toy_processor.json"), "w") as f:
            json.dump({"processor_class": "ToyProcessor", "task": self.task, "note": "see toy.py"}, f)

    @classmethod
    def from_pretrained(cls, path):
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        with open(os.path.join(path, "toy_processor.json")) as f:
            task = json.load(f).get("task", "toy-dots")  # no task named: a dots-task model
        # The toy's own tokenizer class, not AutoTokenizer's pick: for some model types (qwen3_5) AutoTokenizer
        # swaps in the family's released class, whose pre-tokenizer splits the toy's numbers into digits.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), task)


def build_tiny_model(tokenizer, *, family: str = "qwen2_5_vl", hidden: int = 128, layers: int = 4,
                     vision_hidden: int = 64, vision_depth: int = 2, seed: int = 0):
    """A randomly initialised ~1M-parameter model of `family` (the real architecture, from the family's
    config class: Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration or
    Qwen3_5ForConditionalGeneration) for the toy tokenizer."""
    import torch
    from transformers import AutoModelForImageTextToText

    ids = tokenizer.convert_tokens_to_ids
    config = tiny_config(family, tokenizer, hidden=hidden, layers=layers, vision_hidden=vision_hidden,
                         vision_depth=vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model
