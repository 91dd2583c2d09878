"""Stage 1a of SRPO (arXiv 2506.01713, Sec. 3.1): build the reflection SFT data.

The policy answers a pool of visual problems with chain of thought, each answer is graded, N
problems are kept with ~30% right and ~70% wrong first answers, and a stronger teacher writes a
reflection on each. One SFT sample (paper's layout; no second <think>):

    system:    dataset.SYSTEM_PROMPTS["reflect"]
    user:      image + question
    assistant: <think>{policy CoT}</think>\\n<answer>{policy answer}</answer>\\n
               <reflection>{teacher reflection}</reflection>\\n<answer>{gold}</answer>     (one string)

Toy (the defaults; ~20 s on 2 CPU cores; the policy is the shipped toy base, toy/base_model):

    python 01_reflect_data.py          # the paper's set -> runs/toy/reflect/: sft_reflect.jsonl,
                                       #    sft_cot.jsonl, sft_scratchpad.jsonl, images/, stats.json
    python 01_reflect_data.py --pool_size 3600 --direct_rows 1200   # `make demo`'s recipe (~30 s): the
                                       #    paper's set + 1,200 right answers without a reflection
    python 01_reflect_data.py --data toy-dots --model runs/toy-dots/base --out_dir runs/toy-dots/reflect

The default teacher `oracle` is a STAND-IN for the paper's o4-mini that only exists for the toy
tasks (toy.oracle_reflection). On the two-step task it writes the check procedure from the value
drawn in the image and the first attempt alone ("Check: blue: 5. 5 x 7 = 35. 35 + 3 = 38. The first
answer is wrong."); on the dots task it reads the structured solution and names the first wrong step.

Real scale (the paper: Qwen2.5-VL-7B policy, o4-mini teacher, ~100K pool, N = 10K, 1024 tokens):

    export OPENAI_API_KEY=...                 # read from the environment only, never logged or saved
    python 01_reflect_data.py --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data YOUR_ORG/YOUR_POOL --split train --image_column image \\
        --question_column question --answer_column answer --choices_column "" --id_column "" \\
        --pool_size 100000 --num_samples 10000 --max_new_tokens 1024 --batch_size 32 \\
        --teacher openai --teacher_model o4-mini --concurrency 16 --out_dir runs/real/reflect

YOUR_ORG/YOUR_POOL stands for a Hugging Face dataset with an image, a question and a gold answer
column (e.g. Mulberry-260K, MathV360K or LLaVA-CoT problems exported that way); `--data` may also
be a local .jsonl/.json/.parquet file whose image column holds paths relative to the file. Any
OpenAI-compatible server works as the teacher (vLLM, SGLang: `--base_url http://localhost:8000/v1`);
`--teacher hf --teacher_model DIR` uses a local transformers model.

Files in out_dir. Everything is appended as it arrives, so a rerun after a crash or Ctrl-C skips
finished work and resumes with the same results an uninterrupted run would give:
    answers.jsonl      one row per answered pool problem: id, row, question, answer (gold), choices,
                       response, first_answer, correct, well_formed
    skipped.jsonl      rows left out and why (empty question, gold not a letter/number, bad image)
    sft_reflect.jsonl  the reflection SFT set (prompt_style "reflect"), one row per teacher reflection
    sft_cot.jsonl      the plain-CoT SFT set for the paper's ablation (prompt_style "plain"): toy: the
                       correct CoT (toy.cot_response) of the problems of sft_reflect.jsonl (the selected
                       ones and --direct_rows'); real data: the policy's own right, well-formed answers
                       from the pool (rejection sampling, one sample per problem), as many rows
    sft_scratchpad.jsonl  two-step toy task only: the same problems with the check procedure as the
                       first (and only) attempt (toy.cot_response(stepwise=True)): the `scratchpad`
                       baseline, which buys the same serial computation without a reflection
    images/<id>.png    the images of both sets;  stats.json  the counts printed at the end
Rows load with datasets.load_dataset("json", data_files=...) and read images relative to out_dir.
"""

import base64
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from machinery import cli, dataset, grading, llm_client, policy, rollout
import toy


@dataclass
class Args(dataset.DataArgs):
    """Stage 1a: policy answers -> 30/70 right/wrong selection -> teacher reflections -> SFT JSONL. Resume
    after a crash or Ctrl-C: rerun the same command (finished answers and reflections are kept)."""

    model: str = "toy/base_model"
    """policy model: local dir, LoRA output dir or hub id (toy: the shipped base; toy-dots: runs/toy-dots/base)"""
    pool_size: int = 2400
    """problems the policy answers, a seeded sample of the data (the paper: ~100K); 0 = all"""
    out_dir: str = "runs/toy/reflect"
    """where answers, the SFT sets, images and stats are written"""
    seed: int = 0
    """random seed: toy pool, policy sampling, selection"""
    temperature: float = 0.2
    """policy sampling temperature (the paper: 0.2)"""
    max_new_tokens: int = 64
    """policy answer length cap (the paper: 1024; toy answers are ~20 tokens)"""
    batch_size: int = 64
    """problems per policy generation batch (and per hf-teacher batch)"""
    threads: int = 1
    """torch CPU threads; 1 suits the tiny toy model and stays fast beside other jobs (0 = torch's default)"""
    num_samples: int = 1200
    """N, problems kept for SFT (the paper: 10K; on the toy, 600 left reflection SFT 8 points lower than
    1,200)"""
    correct_fraction: float = 0.3
    """share of kept problems whose first answer is right (the paper: 0.3)"""
    fill_from_other: bool = True
    """when the pool is short of right (or wrong) answers, fill N from the other kind"""
    teacher: str = "oracle"
    """'oracle' (toy stand-in), 'openai' (OpenAI-compatible endpoint) or 'hf' (local model)"""
    oracle_reread: bool = True
    """oracle, two-step task: the check reads n off the image again before the two operations (without it,
    an exercise: what must a reflection contain for SFT to learn the check?)"""
    teacher_model: str = "o4-mini"
    """openai: the model name; hf: a model directory or hub id"""
    base_url: str = "https://api.openai.com/v1"
    """openai: the endpoint, up to /v1 (vLLM / SGLang / local servers: http://host:port/v1)"""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable holding the API key (unset = send no key)"""
    json_mode: bool = True
    """openai: ask for response_format={"type": "json_object"}"""
    concurrency: int = 8
    """openai: requests in flight at once"""
    timeout_s: float = 120.0
    """openai: seconds per request before it counts as timed out"""
    max_retries: int = 5
    """openai: retries of a request after a timeout, connection error, 429 or 5xx"""
    backoff_s: float = 1.0
    """openai: first retry waits ~this long (x2 per retry, with jitter)"""
    max_json_retries: int = 2
    """times a teacher is re-asked after a reply that is not {"reflection": "..."}"""
    teacher_max_new_tokens: int = 512
    """hf: reflection length cap"""
    write_cot: bool = True
    """also write sft_cot.jsonl, the plain chain-of-thought SFT set"""
    direct_rows: int = 0
    """also put this many rows WITHOUT a reflection into sft_reflect.jsonl: the policy's own right answers to
    pool problems not selected, verbatim (it answers once and stops). 0 = the paper's set, where every row
    reflects; > 0 teaches the habit on part of the answers only, for RL to spread (Tsilivis et al. 2025)"""


# A number, or a capital option letter: the paper keeps only answers that are a letter A-D or a number.
GOLD_RE = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)|\(?[A-Z]\)?\.?")

TEACHER_SYSTEM = (
    "You are an expert teacher of visual reasoning. You review a student's attempt at a question "
    "about an image and write the reflection the student should have written about their own work."
)
TEACHER_PROMPT = """Question: {question}

The student's reasoning: {think}
The student's answer: {answer}
The correct answer: {gold} (the student was {verdict})

Write a reflection in the student's voice ("I ..."), as a critique of the reasoning above: name any
logical flaw or missing information, say what was right, and say how to improve it. {task}
Do not mention that you were given the correct answer; reach it from the image and the question.
Return only JSON: {{"reflection": "..."}}"""
TASK_RIGHT = "The answer is right: show how to reach it with shorter, less redundant reasoning."
TASK_WRONG = "The answer is wrong: find the first error, explain it, and revise the reasoning to the correct answer."
REASK = 'That was not valid. Reply with only a JSON object of the form {"reflection": "..."} and nothing else.'


class TeacherError(Exception):
    """One item failed at the teacher (counted as a teacher failure; a rerun tries it again)."""


# ----------------------------------------------------------------------------------------------
# Files and secrets


def repair_jsonl(path):
    """Cut a torn last line (a kill mid-write), so that later appends cannot glue two rows together."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def write_jsonl_atomic(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


_SECRETS = []
_STOP = threading.Event()  # set on Ctrl-C: worker threads stop retrying instead of holding the exit


def scrub(text) -> str:
    """`text` with every secret (the API key) replaced by '***': for every message we print or raise."""
    text = str(text)
    for s in _SECRETS:
        text = text.replace(s, "***")
    return text


# ----------------------------------------------------------------------------------------------
# 1. Problems


def screen_pool(ds, args):
    """The paper keeps only problems whose gold answer is a letter or a number (Stage 1a, step 1)."""
    return dataset.screen_problems(
        ds, args, gold_problem=lambda gold: None if GOLD_RE.fullmatch(gold) else "gold is not a letter or a number")


def open_image(value, base_dir):
    """A pool row's image; a row without one cannot be used here (the teacher and SFT rows need it)."""
    image = dataset.open_image(value, base_dir)
    if image is None:
        raise dataset.ImageError("missing image", "no image in the row")
    return image


# ----------------------------------------------------------------------------------------------
# 2. Policy answers (phase a)


def answer_pool(args, ds, base_dir, problems, answers_path, skipped_path):
    """The policy answers every problem not yet in answers.jsonl; rows are appended batch by batch.

    The pool is cut into fixed batches, each sampled with its own seed, so a resumed run produces
    exactly what an uninterrupted one would.
    """
    done = {r["id"] for r in dataset.read_jsonl(answers_path)} | {r["id"] for r in dataset.read_jsonl(skipped_path)}
    chunks = [problems[i:i + args.batch_size] for i in range(0, len(problems), args.batch_size)]
    todo = [(k, c) for k, c in enumerate(chunks) if any(p["id"] not in done for p in c)]
    if not todo:
        return
    base, adapter = policy.resolve_model(args.model)
    model, processor = policy.load_policy(base, adapter_path=adapter)
    model.eval()
    images = ds.select_columns([args.image_column])
    system = dataset.SYSTEM_PROMPTS["plain"]  # the policy answers in plain <think><answer> form
    for k, chunk in tqdm(todo, desc="policy answers", unit="batch"):
        batch, pils = [], []
        for p in chunk:
            try:
                pils.append(open_image(images[p["row"]][args.image_column], base_dir))
                batch.append(p)
            except dataset.ImageError as e:
                if p["id"] not in done:
                    reason, detail = e.reason, str(e)
                    tqdm.write(f"skipping row {p['id']}: {reason} ({detail})")
                    dataset.append_jsonl(skipped_path, {"id": p["id"], "row": p["row"], "reason": reason,
                                                       "detail": detail})
        if not batch:
            continue
        torch.manual_seed(args.seed * 1_000_003 + k)  # per-batch seed: resume == uninterrupted
        inputs = dataset.encode_prompts(processor, [p["question"] for p in batch], pils, system)
        _, _, texts = rollout.generate(model, processor, inputs, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature)
        for p, text in zip(batch, texts):
            if p["id"] in done:
                continue  # a batch cut short by a kill is redone whole, but written once
            pred = grading.first_answer(text)
            dataset.append_jsonl(answers_path, {
                **p, "response": text, "first_answer": pred,
                "correct": grading.is_correct(pred, p["answer"], p["choices"] or None),
                # The SFT target keeps the policy's own <think>/<answer>, so only answers in exactly
                # that form can be selected; the others are counted as malformed, not rebuilt.
                "well_formed": is_well_formed(text)})


def is_well_formed(text) -> bool:
    """Exactly `<think>non-empty</think> <answer>non-empty</answer>`, the form the SFT target keeps."""
    p = grading.parse_response(text)
    return p["layout"] == ("think", "answer") and bool(p["think1"]) and bool(p["answer1"])


# ----------------------------------------------------------------------------------------------
# 3. Selection


def select(answers, n, correct_fraction, seed, fill_from_other=True):
    """N well-formed answers, ~correct_fraction of them right; deterministic given `seed`.

    Returns (selected rows in pool order, a note when the pool cannot supply the mix, else None).
    """
    usable = sorted((a for a in answers if a["well_formed"]), key=lambda a: a["row"])
    right = [a for a in usable if a["correct"]]
    wrong = [a for a in usable if not a["correct"]]
    want_right = round(n * correct_fraction)
    want_wrong = n - want_right
    n_right, n_wrong = min(want_right, len(right)), min(want_wrong, len(wrong))
    note = None
    if (n_right, n_wrong) != (want_right, want_wrong):
        if fill_from_other:
            n_right += min(n - n_right - n_wrong, len(right) - n_right)
            n_wrong += min(n - n_right - n_wrong, len(wrong) - n_wrong)
        note = (f"the pool cannot supply the mix: wanted {want_right} right + {want_wrong} wrong, it has "
                f"{len(right)} right + {len(wrong)} wrong well-formed answers; selected {n_right} + {n_wrong}")
    rng = random.Random(seed)
    chosen = rng.sample(right, n_right) + rng.sample(wrong, n_wrong)
    return sorted(chosen, key=lambda a: a["row"]), note


def select_direct(answers, chosen, n, seed):
    """--direct_rows: n of the policy's right, well-formed answers to problems outside `chosen` (ids),
    deterministic given `seed`, in pool order. Fewer when the pool has fewer."""
    right = [a for a in sorted(answers, key=lambda a: a["row"])
             if a["correct"] and a["well_formed"] and a["id"] not in chosen]
    return sorted(random.Random(seed + 1).sample(right, min(n, len(right))), key=lambda a: a["row"])


def save_image(ds, args, base_dir, row, path):
    if not os.path.exists(path):
        tmp = path + ".tmp.png"
        open_image(ds[row][args.image_column], base_dir).save(tmp)
        os.replace(tmp, path)  # a kill never leaves a half-written image behind


# ----------------------------------------------------------------------------------------------
# 4. Teachers: each yields (item, reflection or None, error or None) as results arrive


def parse_reflection(text):
    """The reflection in a teacher reply `{"reflection": "..."}` (a ```json fence is tolerated), else None.

    Example: parse_reflection('{"reflection": "I misread red."}') == "I misread red."
    """
    s = (text or "").strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.S)
    try:
        obj = json.loads(fence[1] if fence else s)
    except json.JSONDecodeError:
        return None
    r = obj.get("reflection") if isinstance(obj, dict) else None
    if not isinstance(r, str) or not r.strip() or any(t in r for t in dataset.TAGS):
        return None  # a tag inside the reflection would break the SFT target's layout
    return r.strip()


def teacher_prompt(item) -> str:
    return TEACHER_PROMPT.format(question=item["question"], think=item["think"], answer=item["first"],
                                 gold=item["answer"], verdict="right" if item["correct"] else "wrong",
                                 task=TASK_RIGHT if item["correct"] else TASK_WRONG)


def oracle_teacher(items, args):
    """Toy only: toy.oracle_reflection reads the structured solution. A stand-in for a real teacher."""
    for item in items:
        yield item, toy.oracle_reflection(item, item["think"], item["correct"], reread=args.oracle_reread), None


def teacher_client(args, key) -> llm_client.ChatClient:
    """The teacher endpoint, with the run's timeout and retry settings; _STOP (Ctrl-C) ends its waits."""
    return llm_client.ChatClient(args.base_url, args.teacher_model, key, timeout_s=args.timeout_s,
                                 max_retries=args.max_retries, backoff_s=args.backoff_s, stop=_STOP)


def openai_reflect(item, args, key, client=None) -> str:
    """Ask for one reflection (image inline as a data URL); re-ask up to max_json_retries times on bad JSON.

    `client`: a teacher_client(args, key) to share (openai_teacher passes one, so the requests of all
    items reuse connections); a fresh one otherwise. HTTP 401/403/404 raise llm_client.EndpointRefused
    (a RuntimeError that stops the run); every other failure is this item's TeacherError.
    """
    client = client or teacher_client(args, key)
    params = {"response_format": {"type": "json_object"}} if args.json_mode else {}
    with open(item["image_path"], "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "system", "content": TEACHER_SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                             {"type": "text", "text": teacher_prompt(item)}]}]
    for _ in range(args.max_json_retries + 1):
        try:
            reply = client.complete(messages, **params)
        except llm_client.RequestFailed as e:
            raise TeacherError(scrub(e)) from None
        reflection = parse_reflection(reply)
        if reflection:
            return reflection
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": REASK}]
    raise TeacherError(scrub(f"no valid JSON after {args.max_json_retries + 1} asks, "
                             f"last reply: {reply[:200]!r}"))


def openai_teacher(items, args):
    key = os.environ.get(args.api_key_env, "")
    if key:
        _SECRETS.append(key)
    else:
        tqdm.write(f"note: ${args.api_key_env} is not set; sending requests without an API key")
    _STOP.clear()
    client = teacher_client(args, key)
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = {pool.submit(openai_reflect, item, args, key, client): item for item in items}
        for fut in as_completed(futures):
            try:
                yield futures[fut], fut.result(), None
            except TeacherError as e:
                yield futures[fut], None, str(e)
    finally:  # Ctrl-C or a fatal error: drop queued requests; what was written stays
        _STOP.set()
        pool.shutdown(wait=False, cancel_futures=True)


def hf_teacher(items, args):
    """A local vision-language model as the teacher: greedy first, then sampled re-asks on bad JSON."""
    base, adapter = policy.resolve_model(args.teacher_model)
    model, processor = policy.load_policy(base, adapter_path=adapter)
    model.eval()
    for i in range(0, len(items), args.batch_size):
        chunk = items[i:i + args.batch_size]
        prompts = [teacher_prompt(it) for it in chunk]
        pils = [open_image(it["image_path"], ".") for it in chunk]
        found, last, pending = {}, {}, list(range(len(chunk)))
        for ask in range(args.max_json_retries + 1):
            inputs = dataset.encode_prompts(processor, [prompts[j] for j in pending], [pils[j] for j in pending],
                                           TEACHER_SYSTEM)
            _, _, texts = rollout.generate(model, processor, inputs, max_new_tokens=args.teacher_max_new_tokens,
                                          temperature=0.0 if ask == 0 else 0.7)
            for j, text in zip(pending, texts):
                last[j], reflection = text, parse_reflection(text)
                if reflection:
                    found[j] = reflection
            pending = [j for j in pending if j not in found]
            if not pending:
                break
        for j, item in enumerate(chunk):
            yield (item, found[j], None) if j in found else (
                item, None, f"no valid JSON after {args.max_json_retries + 1} tries, last reply: {last[j][:200]!r}")


TEACHERS = {"oracle": oracle_teacher, "openai": openai_teacher, "hf": hf_teacher}


# ----------------------------------------------------------------------------------------------
# 5. SFT rows


def sft_row(a, response, prompt_style, first_correct):
    """One row of the SFT JSONL schema shared with 02_sft.py."""
    return {"id": a["id"], "question": a["question"], "image": f"images/{a['id']}.png", "answer": a["answer"],
            "choices": a["choices"], "response": response, "prompt_style": prompt_style,
            "first_correct": first_correct}


def reflect_target(a, reflection) -> str:
    """The paper's SFT target: the policy's own first attempt, the reflection, then the gold answer.

    The first attempt is kept verbatim (it is well-formed: nothing but its two blocks), not rebuilt
    from stripped block contents: `<think> red` and `<think>red` tokenize differently, and teaching
    the policy a spelling of its own answer that it never writes costs it what it had learned.
    """
    return f"{a['response'].strip()}\n<reflection>{reflection}</reflection>\n<answer>{a['answer']}</answer>"


def main(args: Args):
    if args.teacher not in TEACHERS:
        raise cli.UserError(f"--teacher must be one of {sorted(TEACHERS)}, got {args.teacher!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    out = args.out_dir
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("answers", "skipped", "sft_reflect", "sft_cot", "sft_scratchpad")}
    for path in paths.values():
        repair_jsonl(path)

    # 1. Problems: drop rows with no question or a gold that is not a letter or a number.
    if not args.image_column:
        raise cli.UserError("01 needs --image_column: the teacher and the SFT rows work on the problem's image")
    ds, base_dir = dataset.load_problems(args, args.pool_size, args.seed)
    if args.teacher == "oracle" and "solution" not in ds.column_names:
        raise cli.UserError("--teacher oracle only works on toy problems (it reads their `solution` column); "
                         "use --teacher openai or --teacher hf")
    problems, skipped = screen_pool(ds, args)
    known = {r["id"] for r in dataset.read_jsonl(paths["skipped"])}
    for s in skipped:
        if s["id"] not in known:
            dataset.append_jsonl(paths["skipped"], s)

    # 2. The policy answers the pool (phase a; resumable).
    answer_pool(args, ds, base_dir, problems, paths["answers"], paths["skipped"])
    answers = dataset.read_jsonl(paths["answers"])
    skipped = dataset.read_jsonl(paths["skipped"])
    for reason, n in Counter(s["reason"] for s in skipped).items():
        ids = [s["id"] for s in skipped if s["reason"] == reason]
        print(f"skipped {n} row(s), {reason}: {', '.join(ids[:5])}{' ...' if n > 5 else ''}")

    # 3. Select N problems with the paper's right/wrong mix (deterministic given the seed).
    selected, note = select(answers, args.num_samples, args.correct_fraction, args.seed, args.fill_from_other)
    if note:
        print(f"WARNING: {note}")

    # 4. The teacher writes a reflection for each selected problem not yet done (phase b; resumable).
    done = {r["id"] for r in dataset.read_jsonl(paths["sft_reflect"])}
    chosen = {a["id"] for a in selected}
    if done - chosen:
        print(f"WARNING: {len(done - chosen)} rows in {paths['sft_reflect']} are from another selection "
              f"(changed --num_samples/--seed?); use a fresh --out_dir")
    items = []
    for a in selected:
        if a["id"] not in done:
            p = grading.parse_response(a["response"])
            items.append({**a, "think": p["think1"], "first": p["answer1"],
                          "image_path": os.path.join(out, "images", f"{a['id']}.png")})
            save_image(ds, args, base_dir, a["row"], items[-1]["image_path"])
    with tqdm(total=len(items), desc=f"teacher ({args.teacher})") as bar:
        for item, reflection, error in TEACHERS[args.teacher](items, args):
            if reflection:
                dataset.append_jsonl(paths["sft_reflect"], sft_row(item, reflect_target(item, reflection), "reflect",
                                                                  item["correct"]))
            else:
                bar.write(scrub(f"teacher failed on {item['id']}: {error}"))
            bar.update()

    # 4b. --direct_rows: the policy's own right answers to other pool problems, with no reflection.
    direct = select_direct(answers, chosen, args.direct_rows, args.seed)
    done = {r["id"] for r in dataset.read_jsonl(paths["sft_reflect"])}
    for a in direct:
        if a["id"] not in done:
            save_image(ds, args, base_dir, a["row"], os.path.join(out, "images", f"{a['id']}.png"))
            dataset.append_jsonl(paths["sft_reflect"], sft_row(a, a["response"].strip(), "reflect", True))

    # 5. The plain-CoT SFT set for the ablation (rewritten whole each run: it needs no teacher), and on
    # the two-step toy task the scratchpad set: the same problems, the check procedure as the first attempt.
    # Both cover the problems the reflection set covers, --direct_rows' included.
    covered = sorted(selected + direct, key=lambda a: a["row"])
    scratchpad = [sft_row(a, toy.cot_response(a, stepwise=True), "plain", True) for a in covered
                  if "solution" in a and toy.is_two_step(a)]
    if scratchpad:
        write_jsonl_atomic(paths["sft_scratchpad"], scratchpad)
    cot = []
    if args.write_cot:
        if all("solution" in a for a in covered):  # toy: the correct CoT of the same problems
            cot = [sft_row(a, toy.cot_response(a), "plain", True) for a in covered]
        else:  # real data: the policy's own right answers (rejection sampling)
            right = [a for a in sorted(answers, key=lambda a: a["row"]) if a["correct"] and a["well_formed"]]
            for a in random.Random(args.seed).sample(right, min(len(covered), len(right))):
                save_image(ds, args, base_dir, a["row"], os.path.join(out, "images", f"{a['id']}.png"))
                cot.append(sft_row(a, a["response"].strip(), "plain", True))  # verbatim, as above
        write_jsonl_atomic(paths["sft_cot"], cot)

    written = {r["id"] for r in dataset.read_jsonl(paths["sft_reflect"])} & chosen
    n_right = sum(a["correct"] for a in answers)
    stats = {
        "pool": len(ds), "skipped": len(skipped), "answered": len(answers), "correct": n_right,
        "incorrect": len(answers) - n_right, "malformed": sum(not a["well_formed"] for a in answers),
        "selected": len(selected), "selected_correct": sum(a["correct"] for a in selected),
        "selected_incorrect": sum(not a["correct"] for a in selected), "mix_note": note,
        "reflections": len(written), "teacher_failures": len(chosen - written), "direct": len(direct), "cot": len(cot),
        "scratchpad": len(scratchpad),
        "teacher": args.teacher, "seconds": round(time.time() - t0, 1), "args": asdict(args)}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    sel = max(1, stats["selected"])
    print(f"pool {stats['pool']} (skipped {stats['skipped']}) | answered {stats['answered']}: "
          f"{stats['correct']} correct, {stats['incorrect']} incorrect ({stats['malformed']} malformed) | "
          f"selected {stats['selected']}: {stats['selected_correct']} correct "
          f"({stats['selected_correct'] / sel:.0%}) + {stats['selected_incorrect']} incorrect "
          f"({stats['selected_incorrect'] / sel:.0%}) | reflections {stats['reflections']}, "
          f"teacher failures {stats['teacher_failures']} | cot {stats['cot']} | {stats['seconds']:.0f}s -> {out}")
    return stats


if __name__ == "__main__":
    try:
        cli.run(main, Args)
    except KeyboardInterrupt:  # everything finished so far is on disk
        sys.exit("interrupted: rerun the same command to resume")
