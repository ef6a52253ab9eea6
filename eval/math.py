"""Math evaluation: sample n responses per problem, grade the final \\boxed{} answer, report metrics.

    python -m eval.math --model DIR --data FILE.jsonl --n 64 --temperature 0.6 --top-p 0.95 \\
        --max-new-tokens 32768 --out DIR [--batch-size B | --max-batch-tokens T] [--backend hf|vllm] [--seed S]
        [--limit L]
    python -m eval.math --model DIR1 DIR2 ... --out OUT1 OUT2 ... [same options]
        several models in one process, one after the other, on the same data and settings (saves the
        start-up per model; each model's samples are what a run of its own would give)

Input: JSONL records with "problem" and "answer", optionally "id" (default: the line number), "dag"
(a synthetic.Problem dict: adds process-verified accuracy) and "k" (difficulty: adds a per-k table).
Prompt: the model's chat template over one user turn, problem + BOXED_INSTRUCTION (--no-instruction
for models trained on bare questions, like the tiny lab's).
Grading (--answer-from, default after-think, what reasoning evaluations use): the answer is the last \\boxed{}
after the last </think>; a sample whose <think> (in its text, or opened by the chat template's generation
prompt) never closes, or that is cut off at --max-new-tokens before its end-of-turn, has no answer and is wrong;
an output without a thinking block is graded on its whole text. --answer-from whole: the last \\boxed{} of the
whole text, truncated or not (the training rewards' reading). summary.json's "truncated" is the cut-off share.

Output in --out:
    samples.jsonl   one line per sample, written a whole problem at a time as problems finish:
                    id, sample, text, answer (extracted), gold, correct, length (generated tokens incl.
                    the end-of-turn token), truncated (no end-of-turn within max_new_tokens)
                    [, process_frac, process_ok] [, k]
    settings.json   what produced the samples: the sampling settings, the model (directory + inputs.model_hash:
                    config.json and the weight files' names, sizes and sampled blocks), the backend, the data
                    file (path + sha256); a resumed run must match them all (refused in one line naming
                    what changed), or --restart deletes the directory's samples and starts afresh
    summary.json    eval.metrics.summarize over the problems of this data file (percentages)
Resumable: problems with all n samples in samples.jsonl are skipped; lines of a partially written
problem are dropped and the problem is generated again.

Determinism: each generate() call is seeded from (seed, first sample of the batch), so a run is
reproducible for the same seed, batch size and set of pending problems (vLLM: per sample).
Sampling uses only temperature and top_p (temperature 0: greedy); the model's generation_config
sampling defaults (top_k, repetition_penalty, ...) are overridden with neutral values.

Bad input (cli.py's convention: one line `eval.math: error: ...` on stderr, exit status 2, nothing written),
all checked before any model is loaded or any --out directory is made: --n < 1, --temperature < 0,
--top-p outside (0, 1], --max-new-tokens / --batch-size / --max-batch-tokens / --limit < 1, one --out per --model (all different);
a missing --data file, a line that is not UTF-8 or not a JSON object, a record without "problem" (a string)
or "answer", duplicate ids (file:line each), no records; a --model that is not a directory holding
config.json (valid JSON), weights (model.safetensors / pytorch_model.bin, or their .index.json) and a
tokenizer with a chat template; an --out that cannot be made or written, or whose settings.json holds other
settings, another model or other data (without --restart). Context length: when the longest prompt + --max-new-tokens exceeds the model's positions
(config.json's max_position_embeddings, times the factor of a yarn / linear / dynamic rope_scaling), the run
is REFUSED with the largest --max-new-tokens that fits (not capped: settings.json and every sample then keep
the value asked for).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import cli
from eval import parallel
from eval.inputs import (InputError, check_model_dir, file_sha256, load_records, max_positions,  # noqa: F401
                         model_hash)  # (file_sha256, model_hash, load_records: re-exported for the tests)
from eval.metrics import summarize
from eval.resume import check_settings, identity, load_finished, model_dir_of
from reward import ANSWER_FROM, final_text, grade_answer

BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
SETTINGS_KEYS = ("n", "temperature", "top_p", "max_new_tokens", "seed", "instruction", "answer_from", "model", "model_hash",
                 "backend", "data", "data_hash")


# --- records and prompts ------------------------------------------------------------------------


def build_prompt(tokenizer, problem: str, instruction: str) -> str:
    """Chat-template text of one user turn (problem + instruction), ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": problem + instruction}],
                                         add_generation_prompt=True, tokenize=False)


def _seed_for(seed: int, problem_id: str, sample: int) -> int:
    return zlib.crc32(f"{seed}:{problem_id}:{sample}".encode()) & 0x7FFFFFFF


# --- backends -----------------------------------------------------------------------------------

def generate_hf(model, tokenizer, prompts: list[str], *, temperature: float, top_p: float,
                max_new_tokens: int, seed: int) -> list[tuple[str, int, bool]]:
    """HF generate on a batch of prompt texts (left padded). Returns (text, length, truncated) each."""
    import torch
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {tokenizer.eos_token_id}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                           top_k=0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                           **sampling)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its last token
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=cfg)  # [B, T_prompt + T_new]
    new = out[:, enc["input_ids"].shape[1]:].tolist()  # [B, T_new]
    results = []
    for row in new:
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        tokens = row if stop is None else row[:stop]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append((text, len(row) if stop is None else stop + 1, stop is None))
    return results


def generate_vllm(llm, tokenizer, prompts: list[str], *, temperature: float, top_p: float,
                  max_new_tokens: int, seeds: list[int]) -> list[tuple[str, int, bool]]:
    """vLLM generation, one request per prompt with its own seed. The prompts go in as token ids, tokenized
    like the HF path and the length check (add_special_tokens=False): a text prompt would get the tokenizer's
    special tokens added again (a double BOS for templates that already emit one: Llama-3, R1-Distill-Llama)."""
    from vllm import SamplingParams

    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=s) for s in seeds]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason == "length")
            for o in outputs]


# --- evaluation ---------------------------------------------------------------------------------

DEFAULT_BATCH_TOKENS = 262_144  # HF: KV-cache tokens per generate() call (a 7B's 56 KiB/token: 14 GiB)


def default_batch_size(tokenizer, prompts: list[str], pending: int, *, backend: str, max_new_tokens: int,
                       max_batch_tokens: int) -> int:
    """Sequences per generate() call when --batch-size is not given. vllm: every pending sample in one call
    (continuous batching refills the slots of finished sequences; per-problem batches would leave them idle).
    hf: as many as fit a KV cache of max_batch_tokens tokens at the longest prompt + max_new_tokens,
        batch = max(1, max_batch_tokens // (longest prompt + max_new_tokens))
    (a 7B at 31,744 new tokens: 8 sequences; 64 would hold ~117 GB of KV cache)."""
    if backend == "vllm" or not prompts:
        return max(1, pending)
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    return max(1, max_batch_tokens // (longest + max_new_tokens))


def grade(rec: dict, sample: int, text: str, length: int, truncated: bool, *, answer_from: str = "after-think",
          think_open: bool = False) -> dict:
    """One samples.jsonl record: the answer is reward.grade_answer of reward.final_text (after-think: the text
    after the last </think>; none when the thinking never closed or the sample was cut off): its last \\boxed{},
    or its boxes joined as the gold lists its values ("x = \\boxed{1} and x = \\boxed{-2}" vs gold 1,-2)."""
    final = final_text(text, truncated=truncated, answer_from=answer_from, think_open=think_open)
    answer, correct = grade_answer(final, str(rec["answer"]))
    out = {"id": rec["id"], "sample": sample, "text": text, "answer": answer, "gold": str(rec["answer"]),
           "correct": correct, "length": length, "truncated": truncated}
    if "dag" in rec:
        import synthetic  # the tiny lab's task; only needed for its problems

        frac, ok = synthetic.process_reward(synthetic.Problem.from_dict(rec["dag"]), text)
        out["process_frac"], out["process_ok"] = frac, ok
    if "k" in rec:
        out["k"] = rec["k"]
    return out


def evaluate(model, tokenizer, records: list[dict], *, n: int, temperature: float, top_p: float,
             max_new_tokens: int, out_dir, batch_size: int | None = None,
             max_batch_tokens: int = DEFAULT_BATCH_TOKENS, seed: int = 0,
             instruction: str = BOXED_INSTRUCTION, backend: str = "hf", model_dir=None, data_path=None,
             restart: bool = False, answer_from: str = "after-think", shard: tuple[int, int] = (0, 1)) -> dict:
    """Generate n samples per record (skipping finished problems), grade, write samples.jsonl and
    summary.json in out_dir, and return the summary. model: a HF causal LM, or a vllm.LLM when
    backend == "vllm". records: load_records() output (unique string ids). model_dir (default: the model's
    own name_or_path when it is a directory) and data_path (the file the records came from) go into
    settings.json with their hashes (identity()); restart=True deletes out_dir's samples, summary and settings
    first instead of resuming. batch_size: sequences per generate() call, None = default_batch_size. answer_from: reward.final_text's mode (after-think: a reasoning model's answer
    follows its last </think>; a prompt whose template opens <think> counts as an opened block).
    shard (i, N): only the samples s = i, i + N, i + 2N, ... of each problem (eval/parallel.py merges the N
    shards; each sample's seed depends on (seed, problem id, s) only, so vLLM's results do not depend on N)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    instruction=instruction, answer_from=answer_from,
                    **identity(model_dir or model_dir_of(model), backend, data_path))
    mine = list(range(shard[0], n, shard[1]))  # this shard's sample indices (all of them when unsharded)
    if shard[1] > 1:
        settings["shard"] = list(shard)
    if restart:
        for name in ("samples.jsonl", "summary.json", "settings.json"):
            (out_dir / name).unlink(missing_ok=True)
    check_settings(out_dir, settings)
    samples_path = out_dir / "samples.jsonl"
    finished = load_finished(samples_path, mine)
    pending = [r for r in records if r["id"] not in finished]
    print(f"eval: {len(records) - len(pending)} of {len(records)} problems already done, "
          f"{len(pending)} to generate ({len(pending) * len(mine)} samples)", flush=True)

    work = [(r, s) for r in pending for s in mine]  # one entry per sample to generate
    prompts = {r["id"]: build_prompt(tokenizer, r["problem"], instruction) for r in pending}
    if batch_size is None:
        batch_size = default_batch_size(tokenizer, list(prompts.values()), len(work), backend=backend,
                                        max_new_tokens=max_new_tokens, max_batch_tokens=max_batch_tokens)
    buffer: dict[str, list] = {r["id"]: [None] * n for r in pending}
    with open(samples_path, "a") as f, tqdm(total=len(work), desc="eval", unit="sample") as bar:
        for start in range(0, len(work), batch_size):
            chunk = work[start:start + batch_size]
            texts = [prompts[r["id"]] for r, _ in chunk]
            seeds = [_seed_for(seed, r["id"], s) for r, s in chunk]
            if backend == "hf":
                outs = generate_hf(model, tokenizer, texts, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seeds[0])
            elif backend == "vllm":
                outs = generate_vllm(model, tokenizer, texts, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, seeds=seeds)
            else:
                raise ValueError(f"unknown backend {backend!r} (hf or vllm)")
            for (rec, s), (text, length, truncated) in zip(chunk, outs):
                prompt = prompts[rec["id"]]
                buffer[rec["id"]][s] = grade(rec, s, text, length, truncated, answer_from=answer_from,
                                             think_open=prompt.rfind("<think>") > prompt.rfind("</think>"))
                if all(buffer[rec["id"]][j] is not None for j in mine):  # write a problem only when whole
                    f.write("".join(json.dumps(buffer[rec["id"]][j]) + "\n" for j in mine))
                    del buffer[rec["id"]]
                    f.flush()
            bar.update(len(chunk))

    ids = {r["id"] for r in records}
    samples = [s for s in _read_samples(samples_path) if s["id"] in ids]
    summary = summarize(samples)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- CLI ----------------------------------------------------------------------------------------

def main(argv=None) -> list[dict]:
    ap = cli.ArgumentParser(prog="eval.math", description="Sample, grade and score a model on a math JSONL file.")
    ap.add_argument("--model", required=True, nargs="+", help="HF model directory (with its tokenizer); several: "
                    "evaluated one after the other")
    ap.add_argument("--data", required=True, help="JSONL with problem, answer [, id, dag, k]")
    ap.add_argument("--out", required=True, nargs="+", help="output directory (resumable), one per --model")
    ap.add_argument("--n", type=int, default=64, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=31744,
                    help="prompt + max-new-tokens must fit the model's positions (31744: the 7B's 32768 less 1024)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per generate() call (default: hf, what fits --max-batch-tokens; vllm, every "
                         "pending sample in one call)")
    ap.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                    help="hf without --batch-size: KV-cache tokens per call, (longest prompt + max-new-tokens) x "
                         "batch (262144: 14 GiB for a 7B at 56 KiB per token)")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first L problems")
    ap.add_argument("--no-instruction", action="store_true",
                    help="prompt with the bare problem (models trained without the boxed instruction)")
    ap.add_argument("--answer-from", choices=ANSWER_FROM, default="after-think",
                    help="after-think (reasoning models): the answer is the last \\boxed{} after the last </think>; "
                         "a sample whose <think> never closes or that is cut off before its end-of-turn has none "
                         "(wrong); no thinking block: the whole text. whole: the last \\boxed{} of the whole text")
    ap.add_argument("--data-parallel", type=int, default=1, metavar="N",
                    help="N processes, one engine each on its own GPU(s), over disjoint shards of the samples, "
                         "merged into --out (eval/parallel.py)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="T",
                    help="vllm: GPUs per engine (models that do not fit one)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="only the samples s = I, I+N, ... of each problem (what --data-parallel runs per process)")
    ap.add_argument("--restart", action="store_true",
                    help="delete each --out's samples, summary and settings and start afresh (default: resume, "
                         "refused when settings.json names other settings, another model or other data)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    instruction = "" if a.no_instruction else BOXED_INSTRUCTION
    a.shard = parallel.check(a)
    records, configs = _check_inputs(a, instruction)
    if a.data_parallel > 1:
        return parallel.run(argv, a, records)

    if a.backend == "vllm":  # the backend is resolved once, before any model is loaded
        try:
            from vllm import LLM
        except ImportError:
            sys.exit("eval.math: error: --backend vllm needs the vllm package (pip install vllm); use --backend hf")
        import torch  # the HF path's dtypes: bf16 on GPU, fp32 on CPU (vLLM's CPU default is bf16)
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        load = lambda d: LLM(model=d, seed=a.seed, dtype=dtype, tensor_parallel_size=a.tensor_parallel_size)
        where = f"vllm ({dtype}, tensor parallel {a.tensor_parallel_size})"
    else:
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        where = f"{device} ({dtype})"
    tokenizers = [_check_tokenizer(a, d, config, records, instruction) for d, config in zip(a.model, configs)]
    summaries = []
    for model_dir, out_dir, tokenizer in zip(a.model, a.out, tokenizers):
        model = load(model_dir)
        print(f"eval: {model_dir} on {where}", flush=True)
        try:
            summary = evaluate(model, tokenizer, records, n=a.n, temperature=a.temperature, top_p=a.top_p,
                               max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                               max_batch_tokens=a.max_batch_tokens, out_dir=out_dir,
                               seed=a.seed, instruction=instruction, backend=a.backend, model_dir=model_dir,
                               data_path=a.data, restart=a.restart, answer_from=a.answer_from, shard=a.shard)
        except InputError as e:  # a corrupt samples.jsonl of an earlier run
            cli.fail("eval.math", e)
        print(json.dumps({k: v for k, v in summary.items() if k != "by_k"}), flush=True)
        summaries.append(summary)
        del model  # one model in memory at a time (a vLLM engine may keep GPU memory: there, one model per run)
    return summaries


def _check_inputs(a, instruction: str) -> tuple[list[dict], list[dict]]:
    """The CLI's checks that need no tokenizer (module docstring): (records, each model's config.json)."""
    def bad(message):
        cli.fail("eval.math", message)

    if len(a.model) != len(a.out):
        bad(f"give one --out per --model (got {len(a.model)} models and {len(a.out)} output directories)")
    outs = [os.path.abspath(o) for o in a.out]
    if len(set(outs)) != len(outs):
        bad(f"--out {next(o for o in a.out if outs.count(os.path.abspath(o)) > 1)} is given twice; each model needs "
            "its own output directory")
    if a.n < 1:
        bad(f"--n {a.n}: must be >= 1 (samples per problem)")
    if not 0 <= a.temperature < float("inf"):
        bad(f"--temperature {a.temperature:g}: must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        bad(f"--top-p {a.top_p:g}: must be in (0, 1]")
    for flag, value in (("--max-new-tokens", a.max_new_tokens), ("--batch-size", a.batch_size),
                        ("--max-batch-tokens", a.max_batch_tokens), ("--limit", a.limit)):
        if value is not None and value < 1:
            bad(f"{flag} {value}: must be >= 1")
    if not os.path.isfile(a.data):
        bad(f"--data {a.data}: {'is a directory' if os.path.isdir(a.data) else 'no such file'} (give a JSONL file of "
            "problem/answer records)")
    try:
        records = load_records(a.data, a.limit)
        if not records:
            bad(f"--data {a.data}: no records (give a JSONL file of problem/answer records)")
        configs = [check_model_dir(d) for d in a.model]
        for model_dir, out in zip(a.model, a.out):
            why = cli.unwritable(out, directory=True)
            if why:
                bad(f"--out {out}: cannot be written: {why}")
            settings = dict(n=a.n, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                            seed=a.seed, instruction=instruction, answer_from=a.answer_from,
                            **identity(model_dir, a.backend, a.data), **({"shard": list(a.shard)} if a.shard[1] > 1
                                                                        else {}))
            if not a.restart:
                check_settings(Path(out), settings, write=False)
    except InputError as e:
        bad(e)
    return records, configs


def _check_tokenizer(a, model_dir: str, config: dict, records: list[dict], instruction: str):
    """The model's tokenizer, after checking that it has a chat template and that the longest prompt +
    --max-new-tokens fits the model's positions (refused otherwise: module docstring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        cli.fail("eval.math", f"--model {model_dir}: its tokenizer has no chat template (prompts are chat-formatted)")
    limit = max_positions(config)
    if limit is not None:
        lengths = [len(ids) for ids in tokenizer([build_prompt(tokenizer, r["problem"], instruction) for r in records],
                                                 add_special_tokens=False)["input_ids"]]
        longest = max(lengths)
        if longest + a.max_new_tokens > limit:
            pid = records[lengths.index(longest)]["id"]
            room = (f"use --max-new-tokens <= {limit - longest}" if limit > longest else
                    "the prompt alone does not fit")
            cli.fail("eval.math", f"--max-new-tokens {a.max_new_tokens}: the longest prompt (id {pid}, {longest} "
                     f"tokens) + {a.max_new_tokens} = {longest + a.max_new_tokens} exceeds the {limit} positions of "
                     f"{os.path.join(model_dir, 'config.json')} (max_position_embeddings); {room}")
    return tokenizer


if __name__ == "__main__":
    main()
