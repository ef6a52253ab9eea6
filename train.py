"""offgrpo training: SFT, off-policy GRPO (+ all-positive bias) and on-policy GRPO under FSDP2.

    torchrun --nproc_per_node=8 train.py configs/bias05.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 train.py configs/tiny/bias05.yaml        # any CPU
    python train.py configs/tiny/bias05.yaml                                           # one rank

One optimizer step:
  1. the sampler draws `questions_per_step` questions (the same set for any world size); each rank
     takes its share, every question with its whole group of G responses;
  2. on-policy and rft only: sample G responses per question with the current policy, score them (sampling.rollout);
  3. N_seq = number of sequences in the step over all ranks (SFT: positive ones) -- computed once,
     all-reduced; the loss divides by it and FSDP sums gradients without dividing again (eq. 6);
  4. per micro-batch: logp by the fused lm_head+log-softmax (fused_logprob.py), ref_logp (live model
     or cached pre-pass) for the k3 KL, advantages per group, the per-token loss (loss.py), backward
     (dpo: pairs per group, a no-grad pass for the sequence sums, then a weighted backward: dpo.py);
  5. clip the grad norm, AdamW step, warmup + cosine; a non-finite loss or grad norm skips the step;
  6. log the step's metrics row (train.loggers: metrics.jsonl, TensorBoard, W&B), save resumable state
     (ckpt/, checkpoint.py) and HF exports (hf/step-N, hf/final);
  7. after every validation.every_epochs-th epoch: sample and grade the validation set on all ranks, log val/
     rows, export hf/epoch-N and keep the best epoch in hf/best (best.json) (sampling.validate_epoch).
Before the loop: data.num_questions draws the question subset, tokenised once per output_dir (token_cache.py);
the cached reference pre-pass (reference.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm
from transformers import AutoTokenizer

import data
import dpo
import loggers
import loss as L
import checkpoint
from config_checks import validate, validate_paths  # noqa: F401 (train.validate for callers)
import dist_utils
import exports
import model_utils as mu
import packing
import reference
import sampling
import token_cache
import yaml_config
from dist_utils import print0
from eval.inputs import load_records
from yaml_config import ConfigError, fill, need


# ---------------------------------------------------------------------------------------------
# Config: every hyperparameter lives in exactly one field below. YAML sections map onto the
# dataclasses; `section.key=value` on the command line overrides. Unknown keys and wrong types
# fail with a one-line message before anything is written.
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    path: str | None = None               # HF directory (config + safetensors [+ tokenizer]) to start from
    init_config: dict | None = None       # Qwen2Config kwargs: a from-scratch model (the tiny lab's base)
    tokenizer: str | None = None          # tokenizer directory; None = model.path
    trust_remote_code: bool = False       # only if the model's repository needs it
    activation_checkpointing: bool = True  # recompute each decoder layer in backward (memory for FLOPs)
    shard_layers: bool = True             # one FSDP unit per decoder layer (False: the whole model is one unit)
    reshard_after_forward: bool = True    # free gathered layer params after forward (False: keep them for backward)
    param_dtype: str = "bfloat16"         # FSDP2 compute dtype on GPU; CPU always computes in float32
    logprob_backend: str = "auto"         # fused_logprobs backend: auto | triton | torch
    attn_implementation: str = "sdpa"     # transformers attention: sdpa | eager | flex_attention | flash_attention_2
                                          # (all exact on packed rows, see packing.py; flash_attention_2 needs the
                                          # flash-attn package and a GPU, and skips sdpa's [L, L] packed mask)


@dataclass
class DataConfig:
    train_path: str = ""                  # curated JSONL (curate.py), one record per question
    group_size: int = 8                   # G responses per question (GRPO group)
    max_len: int = 32768                  # tokens, prompt + response; see overlong
    overlong: str = "truncate"            # a longer sequence: truncate (keep its first max_len tokens, loss on the
                                          # kept response tokens, reward unchanged; released script) | drop
    agreement_weights: dict | None = None  # {agreement bucket lower edge: weight}; None = uniform
    difficulty_weights: dict | None = None  # {source difficulty: weight}; None = uniform
    pass_rates: str | None = None         # JSON {question_id: student pass rate} for edge-of-competence weights
    num_questions: int | None = None      # draw this many questions by the weights (without replacement, seeded)
                                          # and run plain epochs over them (the blog: ~2,000); None = every question,
                                          # the weights then set each epoch's order and leave weight-0 ones out


@dataclass
class LossConfig:
    name: str = "offgrpo"                 # sft | offgrpo | onpolicy | dpo (pairs of a group's teacher samples, dpo.py)
                                          # | rft (SFT on the policy's own correct samples: rejection sampling)
    clip_eps: float | None = 0.2          # PPO clip epsilon; None = no clip (the released code)
    scale_by_std: bool = True             # divide advantages by the group std (blog) or not (released code)
    all_positive_bias: float = 0.0        # b added to the advantage of all-positive groups (blog: 0.5)
    kl_coef: float = 0.0                  # beta of the k3 KL to the reference model
    ref_logprobs: str = "live"            # live (frozen reference model) | cached (pre-pass, off-policy only)
    ref_shard_every: int = 256            # cached: the pre-pass commits a shard every N micro-batches (a restart or
                                          # SIGTERM resumes at the last one every rank committed; reference.py)
    entropy_coef: float = 0.0             # entropy bonus (released code: 0.001); subtracted from the loss
    luffy_gamma: float | None = None      # off-policy shaping f(p) = p / (p + gamma); None = off
    kl_clamp: float | None = None         # k3 clamped to [-c, c] (released code's low_var_kl: 10); None = off
    agg: str = "seq-mean-token-mean"      # how token losses become the step's loss (eq. 6): seq-mean-token-mean
                                          # (the blog's 1/G sum_i 1/|o_i| sum_t) | token-mean (DAPO: / response tokens
                                          # of the step) | seq-mean-token-sum-norm (Dr.GRPO: sum_t / agg_len, / N_seq)
    agg_len: int | None = None            # L of seq-mean-token-sum-norm: the response-token budget
    dpo_beta: float = 0.1                 # DPO's beta: -log sigmoid(beta * margin) per (positive, negative) pair
    dpo_norm: str = "sum"                 # DPO's per-sequence log-prob: sum over response tokens | mean (per token)
    dpo_nll_coef: float = 0.0             # > 0: + coef * token-mean NLL of each pair's chosen response (iterative RPO)


@dataclass
class RolloutConfig:                      # the policy's own samples (loss.name = onpolicy | rft)
    temperature: float = 1.0              # sampling temperature
    top_p: float = 1.0                    # nucleus sampling
    max_new_tokens: int = 1024            # response budget per sample (tokens)
    max_batch_tokens: int = 131072        # KV-cache budget of one generate call: sequences x (prompt + new tokens);
                                          # a rank's samples run in as many calls as it takes (7B bf16: 56 KiB/token)
    backend: str = "hf"                   # hf (model_utils.generate) | vllm (vllm_engine.py: an engine per rank fed
                                          # the policy's weights before each rollout and validation; needs model.path)
                                          # | auto (vllm on a GPU where the package is importable, else hf)
    vllm_gpu_memory_utilization: float = 0.3  # GPU memory fraction the vLLM engine may take (weights + KV cache)


@dataclass
class OptimConfig:
    lr: float = 1e-6                      # peak learning rate
    weight_decay: float = 0.0             # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 0                 # linear warmup (optimizer steps)
    min_lr_ratio: float = 0.1             # cosine floor as a fraction of lr
    grad_clip: float = 1.0                # max global grad norm


@dataclass
class TrainConfig:
    questions_per_step: int = 32          # global batch in questions (x group_size sequences)
    micro_batch_size: int = 8             # sequences per rank per forward/backward (gradient accumulation)
    micro_batch_tokens: int = 0           # > 0: padding-free micro-batches instead -- whole sequences packed into
                                          # one row of at most this many tokens (a longer one goes alone); the
                                          # loss is the same, micro_batch_size is then unused; 0 = padded rows
                                          # (with sdpa a packed row's attention costs T^2: slower on the tiny lab,
                                          # benchmarks/packing.py; meant for flash_attention_2 on GPUs)
    epochs: float = 1.0                   # passes over the data; sets max_steps when max_steps = -1
    max_steps: int = -1                   # optimizer steps; -1 = from epochs
    save_every: int = 100                 # resumable state every N steps (and at the end / on SIGTERM)
    hf_every: int = 0                     # HF export to hf/step-N every N steps; 0 = only hf/final
    keep_checkpoints: int = 2             # complete states kept under ckpt/
    async_save: bool = False              # periodic saves written in the background (dcp.async_save), committed
                                          # after the next step; epoch ends, stops and the last step save in line
    keep_hf: int = 0                      # newest hf/step-N exports kept (a link's target always); 0 = all (exports.py)
    resume: str = "auto"                  # auto (newest complete state in ckpt/) | none
    seed: int = 0                         # sampler order, init, sampling
    max_nonfinite: int = 3                # abort after this many non-finite steps in a row
    sample_every: int = 0                 # decoded samples to samples.jsonl every N steps; 0 = never
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # where metrics rows go: jsonl (metrics.jsonl),
                                          # tensorboard (output_dir/tb), wandb (see loggers.py)
    wandb_project: str = "offgrpo"        # W&B project (train.loggers has wandb)
    wandb_name: str | None = None         # W&B run name; None = output_dir's last component
    wandb_mode: str = "online"            # online | offline (no network; `wandb sync` later) | disabled
    stop_after: int = 0                   # save and exit at this step (time-boxed jobs; the schedule still
                                          # follows max_steps, so a resumed run continues it); 0 = never
    collective_timeout_s: int = 3600      # process-group timeout: longer than the longest stretch one rank spends
                                          # without collectives while others wait (a rollout, a 7B HF export on rank 0)


@dataclass
class ValidationConfig:                   # sampled validation during training (the blog: AIME24 every epoch)
    data: str | None = None               # eval JSONL of problem/answer records, as eval.math reads
    every_epochs: int = 0                 # validate after every N epochs (export hf/epoch-N, keep hf/best); 0 = off
    n: int = 4                            # samples per problem (val/avg@n, pass@k, maj@n)
    temperature: float = 0.6              # sampling temperature (0 = greedy)
    top_p: float = 0.95                   # nucleus sampling
    max_new_tokens: int = 32768           # response budget per sample
    limit: int | None = None              # only the first L problems; None = all
    instruction: bool = True              # append eval.math's boxed-answer instruction (false: bare problem)


@dataclass
class Config:
    output_dir: str = ""                  # everything this run writes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def load_config(path: str, overrides: list[str], *, check_paths: bool = True) -> Config:
    """YAML file + `section.key=value` overrides (values parsed as YAML) -> validated Config.
    check_paths=False skips the existence checks of model and data paths (to lint configs anywhere)."""
    cfg = Config()
    fill(cfg, yaml_config.read(path, overrides), "")
    validate(cfg)
    if check_paths:
        validate_paths(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Helpers used by the loop (kept here so main() reads top to bottom)
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at `total` steps (step is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str]) -> None:
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    try:
        run(load_config(argv[0], argv[1:]))
    except (ConfigError, data.DataError) as e:  # bad config or data: one line on rank 0, no traceback, exit 2
        if os.environ.get("RANK", "0") == "0":
            print(f"{'config' if isinstance(e, ConfigError) else 'data'} error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# The run, in the order it happens. Each step is one function below; run() reads top to bottom.
# ---------------------------------------------------------------------------------------------

def run(cfg: Config) -> None:
    d = dist_utils.setup_distributed(timeout_s=cfg.train.collective_timeout_s)
    torch.manual_seed(cfg.train.seed)
    write_resolved_config(cfg, d)
    cfg.rollout.backend = sampling.resolve_backend(cfg, d.device.type)  # (auto: said once in the log)
    stop = install_sigterm_handler()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    latest = checkpoint.latest_state(os.path.join(cfg.output_dir, "ckpt")) if cfg.train.resume == "auto" else None
    dataset, sampler, total_steps = build_data(cfg, d, tokenizer, resuming=latest is not None)
    model, ref_model, optimizer = build_models(cfg, d, resuming=latest is not None)
    print0(f"model: {mu.num_params(model) / 1e6:.2f}M params, world {d.world_size}, {total_steps} steps")
    step, nonfinite_total, validated = resume(cfg, d, latest, model, optimizer, sampler)
    ref_cache = None
    if (cfg.loss.kl_coef > 0 or cfg.loss.name == "dpo") and cfg.loss.ref_logprobs == "cached":
        ref_cache = reference.prepare(cfg, d, lambda batch: logprobs(cfg, d, model, batch), dataset, tokenizer,
                                      step, stop)  # (SIGTERM inside it: shards committed, exit 0)
    metrics = open_metrics_log(cfg, d, step)
    engine = sampling.make_engine(cfg, d)  # rollout.backend=vllm: this rank's engine; else None (HF generate)
    try:
        train_loop(cfg, d, model, ref_model, ref_cache, optimizer, tokenizer, dataset, sampler, stop, metrics,
                   engine, step=step, total_steps=total_steps, nonfinite_total=nonfinite_total, validated=validated)
    finally:  # (a stop, SIGTERM or an abort leaves train_loop by SystemExit)
        if metrics is not None:
            metrics.close()
    exports.export(model, tokenizer, os.path.join(cfg.output_dir, "hf"), "final", total_steps, dist=d)  # or a link
    if d.rank == 0:
        loggers.write_run_summary(cfg.output_dir)
    print0(f"done: {total_steps} steps; model in {os.path.join(cfg.output_dir, 'hf', 'final')}")
    if engine is not None:
        engine.close()
    dist_utils.teardown_distributed()


# --------------------------------------------------------------------------- setup

def write_resolved_config(cfg: Config, d) -> None:
    """<output_dir>/config.yaml: the config as resolved (file + overrides), written by rank 0."""
    if d.rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def open_metrics_log(cfg: Config, d, step: int):
    """Rank 0's loggers.MetricsLog over train.loggers (resumed at `step`); None on the other ranks."""
    if d.rank != 0:
        return None
    tc = cfg.train
    return loggers.MetricsLog(cfg.output_dir, tc.loggers, resume_step=step, wandb_project=tc.wandb_project,
                              wandb_name=tc.wandb_name, wandb_mode=tc.wandb_mode, run_config=dataclasses.asdict(cfg))


def install_sigterm_handler() -> dict:
    """Preemption: SIGTERM sets stop["requested"]; the loop finishes its step, saves and exits."""
    stop = {"requested": False}

    def on_sigterm(signum, frame):
        stop["requested"] = True
    signal.signal(signal.SIGTERM, on_sigterm)
    return stop


def compute_dtype(cfg: Config, device_type: str):
    """FSDP2's all-gathered compute dtype: model.param_dtype on GPU; CPU always computes in float32."""
    return torch.bfloat16 if (device_type == "cuda" and cfg.model.param_dtype == "bfloat16") else torch.float32


# --------------------------------------------------------------------------- data

def build_data(cfg: Config, d, tokenizer, *, resuming: bool = False):
    """Curated records -> tokenised groups -> a deterministic, resumable, rank-sharded sampler.
    An index pass (no texts kept) feeds the draw (data.num_questions) and the weights; only the drawn questions
    are read and tokenised (data.tokenise_drawn), once per output_dir: rank 0 writes the token copy that every
    rank memory-maps and every restart reuses (token_cache). Returns (dataset, sampler, total optimizer steps)."""
    dcfg, path = cfg.data, cfg.data.train_path
    Q = cfg.train.questions_per_step  # (before anything is read or written)
    need(Q % d.world_size == 0, f"train.questions_per_step={Q} must be divisible by world size {d.world_size}")
    records = data.read_records(path, index_only=True)
    most = max(r["num_responses"] for r in records)
    if dcfg.group_size > most:  # before the draw: the cause, not its consequence on the weights
        raise data.DataError(f"{path}: data.group_size={dcfg.group_size} but the most responses any question "
                             f"has is {most} ({len(records)} questions)")
    kw = dict(group_size=dcfg.group_size, max_len=dcfg.max_len, overlong=dcfg.overlong)
    few = 0
    if dcfg.num_questions:  # too few responses: never usable, out before the draw as the tokenise-all rule had it
        few = sum(r["num_responses"] < dcfg.group_size for r in records)
        records = [r for r in records if r["num_responses"] >= dcfg.group_size]
    pass_rates = data.read_pass_rates(dcfg.pass_rates) if dcfg.pass_rates else None
    weights = None
    if dcfg.agreement_weights or dcfg.difficulty_weights or pass_rates:
        weights = data.sampling_weights(records, agreement_weights=dcfg.agreement_weights,
                                        difficulty_weights=dcfg.difficulty_weights, pass_rates=pass_rates)
    k = dcfg.num_questions
    order = (data.draw_order(len(records), k, seed=cfg.train.seed, weights=weights) if k
             else list(range(len(records))))

    def build():  # (rank 0, when no matching token copy exists)
        if not k:
            lines = [r["_line"] for r in records]
            return data.GroupDataset(data.read_lines(path, lines), tokenizer, **kw), None, lines
        dataset, chosen = data.tokenise_drawn(path, records, order, k, tokenizer, **kw)
        return dataset, chosen, sorted(records[i]["_line"] for i in order[:k + dataset.report["drawn_replaced"]])
    dataset, chosen, how = token_cache.load_or_build(
        cfg.output_dir, build, token_cache.fingerprint(path, records, order, tokenizer, **kw), path, tokenizer, kw,
        rank=d.rank, resuming=resuming, barrier=dist.barrier if dist.is_initialized() else lambda: None)
    print0(f"data: token copy {how} ({os.path.join(cfg.output_dir, token_cache.DIR)}); {dataset.report}")
    if k:  # the blog's protocol: K questions drawn by the weights, then plain epochs over them
        if d.rank == 0:
            data.write_questions(os.path.join(cfg.output_dir, "questions.jsonl"), records, chosen, weights)
        weights = None
        print0(f"data: drew {len(dataset)} of {len(records)} questions with >= {dcfg.group_size} responses "
               f"({few} with fewer left out; data.num_questions), written to questions.jsonl")
    else:
        print0(f"data: {len(dataset)} questions x {dcfg.group_size} responses")
    if len(dataset) == 0:
        raise data.DataError(f"{path}: no question kept data.group_size={dcfg.group_size} "
                             f"responses ({len(records)} questions; the most responses any has: {most})")
    sampler = data.GroupSampler(len(dataset), Q, rank=d.rank, world_size=d.world_size,
                                seed=cfg.train.seed, weights=weights)
    per_epoch = len(dataset) if weights is None else sum(w > 0 for w in weights)  # an epoch skips weight 0
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * per_epoch / Q)
    return dataset, sampler, total


# --------------------------------------------------------------------------- models

def build_models(cfg: Config, d, *, device_type: str | None = None, resuming: bool = False):
    """The policy (FSDP2, activation checkpointing), the frozen reference (only for a live KL reference)
    and AdamW over the policy's sharded parameters. device_type picks the compute dtype (default: d's;
    benchmarks/memory.py rehearses "cuda" on a CPU mesh). resuming: the policy's base weights are not read
    (the checkpoint overwrites them); the reference's are."""
    build = dict(path=cfg.model.path, init_config=cfg.model.init_config, dist=d,
                 param_dtype=compute_dtype(cfg, device_type or d.device.type), reduce_dtype=torch.float32,
                 trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed,
                 shard_layers=cfg.model.shard_layers, attn_implementation=cfg.model.attn_implementation)
    model = mu.build_model(**build, activation_checkpointing=cfg.model.activation_checkpointing,
                           reshard_after_forward=cfg.model.reshard_after_forward, load_weights=not resuming)
    ref_model = None
    if (cfg.loss.kl_coef > 0 or cfg.loss.name == "dpo") and cfg.loss.ref_logprobs == "live":
        ref_model = mu.build_model(**build, activation_checkpointing=False, requires_grad=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    return model, ref_model, optimizer


def logprobs(cfg: Config, d, model, batch, entropy=False):
    """logp [b, t] (and entropy [b, t]) of a batch's targets by the fused lm_head + log-softmax (eq. 7): one
    forward over its packed row when it has one (batch["packed"], packing.pack), else over its padded rows."""
    if "packed" in batch:
        return mu.packed_logprobs(model, batch["packed"], batch["input_ids"].shape[1],
                                  backend=cfg.model.logprob_backend, return_entropy=entropy)
    return mu.sequence_logprobs(model, batch["input_ids"].to(d.device), batch["attention_mask"].to(d.device),
                                backend=cfg.model.logprob_backend, return_entropy=entropy)


# --------------------------------------------------------------------------- resume

def resume(cfg: Config, d, latest: str | None, model, optimizer, sampler) -> tuple[int, int, int]:
    """`latest`: the newest complete state under ckpt/ when train.resume=auto (run() looked it up once: the data
    and model builds decided by it too). Loads model, optimizer, sampler, RNG and step from it; metrics.jsonl rows
    of steps (and validations) that will be re-run are dropped. Returns (step, non-finite steps so far, epochs
    validated)."""
    step, nonfinite_total, validated = 0, 0, 0
    if latest is not None:
        try:
            extra = checkpoint.load_state(latest, model, optimizer, dist=d)
        except ValueError as e:  # e.g. saved with another world size
            raise SystemExit(f"error: cannot resume from {latest}: {e}") from None
        step, nonfinite_total, validated = extra["step"], extra["nonfinite_total"], extra["validated_epochs"]
        sampler.load_state_dict(extra["sampler"])
        print0(f"resumed from {latest} at step {step}")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if d.rank == 0 and os.path.exists(metrics_path):
        with open(metrics_path) as f:  # (a last line torn by a kill has no newline: dropped as well)
            rows = [(line, json.loads(line)) for line in f if line.strip() and line.endswith("\n")]
        kept = [line for line, r in rows if r["step"] <= step and r.get("val/epoch", 0) <= validated]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    return step, nonfinite_total, validated



# --------------------------------------------------------------------------- one optimizer step

@dataclass
class StepCounts:
    """The step's global normalisers, all-reduced once: sequences N_seq and response tokens N_tok of the
    whole step (SFT: of the positive responses only)."""
    num_seqs: float
    num_tokens: float


def step_counts(cfg: Config, d, items: list[dict]) -> StepCounts:
    """N_seq and N_tok over the whole step and all ranks (one all-reduce, on the device NCCL serves)."""
    sft = cfg.loss.name in ("sft", "rft")
    masks = [m for it in items for m, r in zip(it["loss_mask"], it["rewards"]) if r > 0 or not sft]
    t = torch.tensor([float(len(masks)), float(sum(sum(m) for m in masks))], dtype=torch.float64,
                     device=d.device)                                                  # [2]
    dist.all_reduce(t)
    return StepCounts(num_seqs=max(t[0].item(), 1.0), num_tokens=max(t[1].item(), 1.0))


def aggregate(cfg: Config, token_loss, mask, counts: StepCounts):
    """Eq. 6 (or the aggregation loss.agg names) with the step's global counts: normalised here, once."""
    if cfg.loss.agg == "token-mean":
        return L.token_mean(token_loss, mask, counts.num_tokens)
    if cfg.loss.agg == "seq-mean-token-sum-norm":
        return L.seq_mean_token_sum_norm(token_loss, mask, counts.num_seqs, cfg.loss.agg_len)
    return L.seq_mean_token_mean(token_loss, mask, counts.num_seqs)


def micro_batch_loss(cfg: Config, d, model, ref_model, ref_cache, batch: dict, adv, rewards, ref_rows,
                     counts: StepCounts):
    """Eqs. 3-7 on one micro-batch: logp, ref_logp (live model, or the cache for ref_rows: (question,
    response, tokens) of each row), the per-token loss of loss.name, aggregated with the step's global counts. Returns (loss to backward, stats [6] float64 on the device:
    the loss, response tokens, advantage, KL and entropy as sums of per-sequence means, reward) -- no host
    sync, so a step syncs once, after its last micro-batch."""
    lc = cfg.loss
    mask = batch["loss_mask"][:, 1:].to(d.device)                                      # [b, t]
    logp, entropy = logprobs(cfg, d, model, batch, entropy=True)                        # [b, t] each
    ref_logp = None
    if ref_cache is not None:
        ref_logp = ref_cache.logprobs(ref_rows, batch["input_ids"].shape[1], d.device)  # [b, t]
    elif ref_model is not None:
        with torch.no_grad():
            ref_logp = logprobs(cfg, d, ref_model, batch)                               # [b, t]
    if lc.name in ("sft", "rft"):  # (rft: the rollouts' rewards, graded against the gold)
        mask = mask * (rewards > 0).float()[:, None]                                   # positive responses only
        token_loss = L.sft_token_loss(logp, ref_logp=ref_logp, kl_coef=lc.kl_coef, kl_clamp=lc.kl_clamp)  # [b, t]
    elif lc.name == "offgrpo":
        token_loss = L.off_policy_grpo_token_loss(logp, adv, clip_eps=lc.clip_eps, ref_logp=ref_logp, kl_coef=lc.kl_coef,
                                                  kl_clamp=lc.kl_clamp, luffy_gamma=lc.luffy_gamma)  # [b, t]
    else:  # one update per rollout batch, so the sampling policy is the current one
        token_loss = L.on_policy_grpo_token_loss(logp, logp.detach(), adv, clip_eps=lc.clip_eps, ref_logp=ref_logp,
                                                 kl_coef=lc.kl_coef, kl_clamp=lc.kl_clamp)            # [b, t]
    loss = aggregate(cfg, token_loss, mask, counts)
    if lc.entropy_coef:  # the released code aggregates its entropy bonus like the loss
        loss = loss - lc.entropy_coef * aggregate(cfg, entropy, mask, counts)
    with torch.no_grad():
        kl = L.seq_mean_token_mean(L.kl_k3(logp, ref_logp), mask, 1) if ref_logp is not None else logp.new_zeros(())
        stats = torch.stack([loss.detach() * counts.num_seqs, mask.sum(), (adv * (mask.sum(1) > 0)).sum(), kl,
                             L.seq_mean_token_mean(entropy, mask, 1), rewards.sum()]).double()  # [6]
    return loss, stats


def grpo_backward(cfg: Config, d, model, ref_model, ref_cache, items: list[dict], qidx: list[int], pad_id: int) -> dict:
    """The step's per-token loss, backward: advantages per whole group (eqs. 1-2), then the micro-batches
    (packing.micro_batches: packed or padded), backward each. Returns the step's loss and metrics."""
    G, lc = cfg.data.group_size, cfg.loss
    counts = step_counts(cfg, d, items)
    full = data.collate(items, pad_id)
    rewards_all = full["rewards"].to(d.device)                                         # [B_rank]
    if lc.name in ("sft", "rft"):
        adv_all = torch.zeros_like(rewards_all)                                         # [B_rank]
    else:
        adv_all = L.group_advantages(rewards_all, G, scale_by_std=lc.scale_by_std,
                                     all_positive_bias=lc.all_positive_bias)           # [B_rank]
    stats = torch.zeros(6, dtype=torch.float64, device=d.device)                       # [6]
    n_tok = full["attention_mask"].sum(1).tolist()
    row_key = [(qi, j, n_tok[i * G + j]) for i, qi in enumerate(qidx) for j in range(G)]  # (question, response, tokens)
    used = [i for i, r in enumerate(full["rewards"].tolist()) if r > 0 or lc.name != "sft"]  # SFT: positives only
    plan = [[used[k] for k in b] for b in packing.micro_batches(
        [n_tok[i] for i in used], micro_batch_size=cfg.train.micro_batch_size,
        micro_batch_tokens=cfg.train.micro_batch_tokens, device=d.device)]
    if lc.name == "sft" and not cfg.train.micro_batch_tokens:  # (packed plans are equalised across ranks already)
        plan += [[] for _ in range(dist_utils.max_over_ranks(len(plan), d.device) - len(plan))]
    for rows in plan:  # an empty one (a rank with fewer positives): a forward for FSDP's collectives, weight 0
        dummy, rows = not rows, rows or [0]
        batch = packing.make_batch(full, rows, n_tok, packed=bool(cfg.train.micro_batch_tokens))
        idx = torch.tensor(rows, device=d.device)                                      # [b]
        keys = [row_key[r][:2] + (None,) if dummy else row_key[r] for r in rows]       # None: no cached row needed
        loss, mb_stats = micro_batch_loss(cfg, d, model, ref_model, ref_cache, batch, adv_all[idx],
                                          rewards_all[idx] * (not dummy), keys, counts)  # (reward 0: masked out)
        loss.backward()
        stats += mb_stats
    all_pos = sum(all(r > 0 for r in it["rewards"]) for it in items)
    kept = sum(any(r > 0 for r in it["rewards"]) for it in items)  # questions with a positive response
    stats = torch.cat([stats, torch.tensor([float(all_pos), float(len(items)), float(kept)], dtype=torch.float64,
                                           device=d.device)])                          # [9]
    if ref_model is not None:
        ref_model.reshard()
    dist.all_reduce(stats)
    loss_sum, tokens, adv_sum, kl_sum, ent_sum, reward_sum, all_pos, n_q, kept = stats.tolist()
    n = counts.num_seqs
    return {"loss": loss_sum / n, "tokens": tokens, "perf/micro_batches": len(plan),
            "policy/adv_mean": adv_sum / n, "policy/kl_mean": kl_sum / n, "policy/entropy": ent_sum / n,
            "data/all_positive_share": all_pos / n_q, "data/reward_mean": reward_sum / (n_q * G),
            **({"data/kept_share": kept / n_q} if lc.name == "rft" else {})}


def train_step(cfg: Config, d, model, ref_model, ref_cache, optimizer, items: list[dict], qidx: list[int],
               lr: float, pad_id: int) -> dict:
    """One optimizer step over this rank's groups: the backward of loss.name (grpo_backward; dpo: dpo.backward's
    two passes), then grad-norm clip and AdamW unless the loss or norm is non-finite."""
    if cfg.loss.name == "dpo":
        row = dpo.backward(cfg, d, model, ref_model, ref_cache, items, qidx, pad_id,
                           lambda m, batch: logprobs(cfg, d, m, batch))
    else:
        row = grpo_backward(cfg, d, model, ref_model, ref_cache, items, qidx, pad_id)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    finite = math.isfinite(row["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": row.pop("loss"), "lr": lr, "grad_norm": grad_norm, "tokens": row.pop("tokens"),
            "finite": finite, **row}


# --------------------------------------------------------------------------- the loop

def train_loop(cfg: Config, d, model, ref_model, ref_cache, optimizer, tokenizer, dataset, sampler, stop: dict,
               metrics, engine, *, step: int, total_steps: int, nonfinite_total: int, validated: int) -> None:
    """Optimizer steps until total_steps: draw the step's questions, roll out (on-policy), train_step, log,
    samples, checkpoints; after every validation.every_epochs-th epoch (the state saved first), validation.
    A non-finite step is skipped; max_nonfinite in a row abort. SIGTERM (any rank) or train.stop_after: every
    rank saves at the same step and exits 0. `validated`: epochs whose validation is done."""
    streak = 0
    val_records = None
    if cfg.validation.every_epochs:
        val_records = load_records(cfg.validation.data, cfg.validation.limit)
    bar = tqdm(total=total_steps, initial=step, desc=cfg.loss.name, disable=d.rank != 0, dynamic_ncols=True)
    while True:
        epochs_done = int(sampler.progress)
        if epochs_done > validated:  # an epoch ended: its state is saved (below), so a kill here repeats only this
            if val_records and epochs_done % cfg.validation.every_epochs == 0:
                sampling.validate_epoch(cfg, d, model, tokenizer, val_records, metrics, epoch=epochs_done, step=step,
                                         engine=engine)
            validated = epochs_done
        if step >= total_steps:
            break
        t0 = time.time()
        qidx = sampler.next_step()                                                     # this rank's questions
        items = [dataset[i] for i in qidx]
        generated = None
        if cfg.loss.name in ("onpolicy", "rft"):  # the policy's own samples, graded against the gold
            items = sampling.rollout(cfg, d, model, tokenizer, items, step, engine)
            generated = sampling.generated_tokens(d, items)  # (all ranks: a run's cost, run_summary.json)
        row = train_step(cfg, d, model, ref_model, ref_cache, optimizer, items, qidx,
                         lr_at(step, cfg.optim, total_steps), tokenizer.pad_token_id)
        if row.pop("finite"):
            streak = 0
        else:
            streak, nonfinite_total = streak + 1, nonfinite_total + 1
            print0(f"step {step + 1}: non-finite loss {row['loss']} / grad norm {row['grad_norm']}; step skipped")
            if streak >= cfg.train.max_nonfinite:
                bar.close()  # so the message below is a line of its own
                raise SystemExit(f"error: {streak} non-finite steps in a row (last at step {step + 1}); aborting")
        checkpoint.wait_for_save(d)  # (train.async_save: the previous save, written during this step, commits)
        step += 1
        seconds = time.time() - t0
        if d.rank == 0:
            row = {"step": step, **row, "seconds": seconds, "perf/tokens_per_second": row["tokens"] / max(seconds, 1e-9),
                   "data/epoch": sampler.progress, "loss/nonfinite_skipped": nonfinite_total,
                   **({} if generated is None else {"perf/rollout_tokens": generated})}
            metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", gn=f"{row['grad_norm']:.3f}")
            bar.update(1)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0:
            sampling.write_samples(cfg, d, model, tokenizer, items, step)
        flag = torch.tensor([float(stop["requested"])], device=d.device)                # [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        stopping = flag.item() > 0 or step == cfg.train.stop_after
        epoch_end = int(sampler.progress) > validated  # saved before the (long) validation at the loop's top
        if step % cfg.train.save_every == 0 or step == total_steps or stopping or epoch_end:
            extra = {"step": step, "nonfinite_total": nonfinite_total, "sampler": sampler.state_dict(),
                     "validated_epochs": validated}
            checkpoint.save_state(os.path.join(cfg.output_dir, "ckpt"), step, model, optimizer, extra, dist=d,
                                  keep=cfg.train.keep_checkpoints, background=cfg.train.async_save and not (
                                      stopping or epoch_end or step == total_steps))
        if cfg.train.hf_every and step % cfg.train.hf_every == 0:
            exports.export(model, tokenizer, os.path.join(cfg.output_dir, "hf"), f"step-{step}", step, dist=d,
                           keep_steps=cfg.train.keep_hf)
        if stopping:  # (an epoch's validation, if due, is the resumed run's first act)
            print0(f"{'SIGTERM' if flag.item() > 0 else 'train.stop_after'}: saved state at step {step}; exiting")
            dist_utils.teardown_distributed()
            sys.exit(0)
    bar.close()


if __name__ == "__main__":
    main(sys.argv[1:])
