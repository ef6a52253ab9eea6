"""offgrpo training: SFT, off-policy GRPO (+ all-positive bias) and on-policy GRPO under FSDP2.

    torchrun --nproc_per_node=8 train.py configs/bias05.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 train.py configs/tiny/bias05.yaml        # any CPU
    python train.py configs/tiny/bias05.yaml                                           # one rank

One optimizer step:
  1. the sampler draws `questions_per_step` questions (the same set for any world size); each rank
     takes its share, every question with its whole group of G responses;
  2. on-policy only: sample G responses per question with the current policy, score them (reward.py);
  3. N_seq = number of sequences in the step over all ranks (SFT: positive ones) -- computed once,
     all-reduced; the loss divides by it and FSDP sums gradients without dividing again (eq. 6);
  4. per micro-batch: logp by the fused lm_head+log-softmax (fused_logprob.py), ref_logp (live model
     or cached pre-pass) for the k3 KL, advantages per group, the per-token loss (loss.py), backward;
  5. clip the grad norm, AdamW step, warmup + cosine; a non-finite loss or grad norm skips the step;
  6. log metrics.jsonl, save resumable state (ckpt/) and HF exports (hf/step-N, hf/final).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass, field

import yaml


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


@dataclass
class DataConfig:
    train_path: str = ""                  # curated JSONL (data.py curate), one record per question
    group_size: int = 8                   # G responses per question (GRPO group)
    max_len: int = 32768                  # tokens, prompt + response; longer sequences are dropped
    agreement_weights: dict | None = None  # {agreement bucket lower edge: weight}; None = uniform
    difficulty_weights: dict | None = None  # {source difficulty: weight}; None = uniform
    pass_rates: str | None = None         # JSON {question_id: student pass rate} for edge-of-competence weights


@dataclass
class LossConfig:
    name: str = "offgrpo"                 # sft | offgrpo | onpolicy
    clip_eps: float | None = 0.2          # PPO clip epsilon; None = no clip (the released code)
    scale_by_std: bool = True             # divide advantages by the group std (blog) or not (released code)
    all_positive_bias: float = 0.0        # b added to the advantage of all-positive groups (blog: 0.5)
    kl_coef: float = 0.0                  # beta of the k3 KL to the reference model
    ref_logprobs: str = "live"            # live (frozen reference model) | cached (pre-pass, off-policy only)
    entropy_coef: float = 0.0             # entropy bonus (released code: 0.001); subtracted from the loss
    luffy_gamma: float | None = None      # off-policy shaping f(p) = p / (p + gamma); None = off


@dataclass
class RolloutConfig:                      # on-policy sampling (loss.name = onpolicy)
    temperature: float = 1.0              # sampling temperature
    top_p: float = 1.0                    # nucleus sampling
    max_new_tokens: int = 1024            # response budget per sample (tokens)


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
    epochs: float = 1.0                   # passes over the data; sets max_steps when max_steps = -1
    max_steps: int = -1                   # optimizer steps; -1 = from epochs
    save_every: int = 100                 # resumable state every N steps (and at the end / on SIGTERM)
    hf_every: int = 0                     # HF export to hf/step-N every N steps; 0 = only hf/final
    keep_checkpoints: int = 2             # complete states kept under ckpt/
    resume: str = "auto"                  # auto (newest complete state in ckpt/) | none
    seed: int = 0                         # sampler order, init, sampling
    max_nonfinite: int = 3                # abort after this many non-finite steps in a row
    sample_every: int = 0                 # decoded samples to samples.jsonl every N steps; 0 = never
    stop_after: int = 0                   # save and exit at this step (time-boxed jobs; the schedule still
                                          # follows max_steps, so a resumed run continues it); 0 = never


@dataclass
class Config:
    output_dir: str = ""                  # everything this run writes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(Exception):
    """A problem with the configuration, reported as one line without a traceback."""


def _coerce(value, tp, key):
    """Check `value` against the annotation `tp` (str, int, float, bool, dict, tuple, X | None)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-7` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise ConfigError(f"{key}: expected a list of {len(typing.get_args(tp))} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, typing.get_args(tp)))
    expected = origin or tp
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def _fill(dc, values: dict, prefix: str):
    hints = typing.get_type_hints(type(dc))
    names = [f.name for f in dataclasses.fields(dc)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        current = getattr(dc, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            _fill(current, value, full + ".")
        else:
            setattr(dc, key, _coerce(value, hints[key], full))


def _parse_yaml(text, where: str):
    """yaml.safe_load, its multi-line errors turned into a one-line ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}{at}") from None


def load_config(path: str, overrides: list[str], *, check_paths: bool = True) -> Config:
    """YAML file + `section.key=value` overrides (values parsed as YAML) -> validated Config.
    check_paths=False skips the existence checks of model and data paths (to lint configs anywhere)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:  # bytes: PyYAML reports bad UTF-8 as a YAMLError with a position
        raw = _parse_yaml(f.read(), path)
    raw = {} if raw is None else raw
    need(isinstance(raw, dict), f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            need(isinstance(node, dict), f"override '{item}': '{p}' is not a section")
        node[leaf] = _parse_yaml(value, f"override '{item}'")
    cfg = Config()
    _fill(cfg, raw, "")
    validate(cfg)
    if check_paths:
        validate_paths(cfg)
    return cfg


def need(ok, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Cross-field checks, before the run touches output_dir."""
    need(cfg.output_dir, "output_dir is required")
    need(cfg.loss.name in ("sft", "offgrpo", "onpolicy"), f"loss.name must be sft, offgrpo or onpolicy, got {cfg.loss.name!r}")
    need(cfg.loss.ref_logprobs in ("live", "cached"), f"loss.ref_logprobs must be live or cached, got {cfg.loss.ref_logprobs!r}")
    need(not (cfg.loss.name == "onpolicy" and cfg.loss.ref_logprobs == "cached" and cfg.loss.kl_coef > 0),
         "loss.ref_logprobs=cached needs fixed responses; onpolicy samples new ones -- use live")
    need(cfg.model.logprob_backend in ("auto", "triton", "torch"), "model.logprob_backend must be auto, triton or torch")
    need(cfg.model.param_dtype in ("bfloat16", "float32"), "model.param_dtype must be bfloat16 or float32")
    need(cfg.train.resume in ("auto", "none"), f"train.resume must be auto or none, got {cfg.train.resume!r}")
    need((cfg.model.path is None) != (cfg.model.init_config is None), "set exactly one of model.path and model.init_config")
    need(cfg.model.tokenizer is not None or cfg.model.path is not None, "model.tokenizer is required with model.init_config")
    need(cfg.data.group_size >= 1, "data.group_size must be >= 1")
    need(cfg.loss.name == "sft" or cfg.data.group_size >= 2, "GRPO needs data.group_size >= 2")
    need(cfg.loss.luffy_gamma is None or cfg.loss.clip_eps is None,
         "loss.luffy_gamma replaces the clip: set loss.clip_eps=null with it")
    need(cfg.train.questions_per_step >= 1 and cfg.train.micro_batch_size >= 1, "batch sizes must be >= 1")


def validate_paths(cfg: Config) -> None:
    """The files the run reads must exist (checked before anything is written)."""
    if cfg.model.path is not None:
        need(os.path.isdir(cfg.model.path), f"model.path not found: {cfg.model.path}")
        need(os.path.isfile(os.path.join(cfg.model.path, "config.json")), f"model.path has no config.json: {cfg.model.path}")
        need(any(f.endswith(".safetensors") for f in os.listdir(cfg.model.path)),
             f"model.path has no safetensors weights: {cfg.model.path}")
    need(cfg.model.tokenizer is None or os.path.isdir(cfg.model.tokenizer), f"model.tokenizer not found: {cfg.model.tokenizer}")
    need(os.path.isfile(cfg.data.train_path), f"data.train_path not found: {cfg.data.train_path!r}")
    need(cfg.data.pass_rates is None or os.path.isfile(cfg.data.pass_rates), f"data.pass_rates not found: {cfg.data.pass_rates}")
    need(cfg.loss.luffy_gamma is None or cfg.loss.clip_eps is None,
         "loss.luffy_gamma replaces the clip: set loss.clip_eps=null with it")
    need(cfg.train.questions_per_step >= 1 and cfg.train.micro_batch_size >= 1, "batch sizes must be >= 1")


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
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    import data
    try:
        run(cfg)
    except data.DataError as e:  # bad input data: one line, no traceback
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg: Config) -> None:
    # Heavy imports after config validation, so a bad config fails in a fraction of a second.
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoTokenizer

    import data
    import loss as L
    import model_utils as mu
    import reward

    # -----------------------------------------------------------------------------------------
    # Setup: process group, output dir, resolved config
    # -----------------------------------------------------------------------------------------
    d = mu.setup_distributed()
    print0 = mu.print0
    torch.manual_seed(cfg.train.seed)
    on_gpu = d.device.type == "cuda"
    param_dtype = torch.bfloat16 if (on_gpu and cfg.model.param_dtype == "bfloat16") else torch.float32
    out = cfg.output_dir
    if d.rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    stop_requested = False

    def on_sigterm(signum, frame):  # preemption: finish the step, save, exit
        nonlocal stop_requested
        stop_requested = True
    signal.signal(signal.SIGTERM, on_sigterm)

    # -----------------------------------------------------------------------------------------
    # Data: curated records -> tokenised groups -> a deterministic, resumable, rank-sharded sampler
    # -----------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    records = data.read_records(cfg.data.train_path)
    G = cfg.data.group_size
    dataset = data.GroupDataset(records, tokenizer, group_size=G, max_len=cfg.data.max_len)
    print0(f"data: {len(dataset)} questions x {G} responses; {dataset.report}")
    pass_rates = data.read_pass_rates(cfg.data.pass_rates) if cfg.data.pass_rates else None
    weights = None
    if cfg.data.agreement_weights or cfg.data.difficulty_weights or pass_rates:
        weights = data.sampling_weights(dataset.records, agreement_weights=cfg.data.agreement_weights,
                                        difficulty_weights=cfg.data.difficulty_weights, pass_rates=pass_rates)
    Q = cfg.train.questions_per_step
    if Q % d.world_size:
        raise SystemExit(f"config error: train.questions_per_step={Q} must be divisible by world size {d.world_size}")
    sampler = data.GroupSampler(len(dataset), Q, rank=d.rank, world_size=d.world_size,
                                seed=cfg.train.seed, weights=weights)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * len(dataset) / Q)

    # -----------------------------------------------------------------------------------------
    # Model: policy (FSDP2), optional frozen reference, optimizer
    # -----------------------------------------------------------------------------------------
    build = dict(path=cfg.model.path, init_config=cfg.model.init_config, dist=d, param_dtype=param_dtype,
                 reduce_dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed,
                 shard_layers=cfg.model.shard_layers)
    model = mu.build_model(**build, activation_checkpointing=cfg.model.activation_checkpointing,
                           reshard_after_forward=cfg.model.reshard_after_forward)
    use_ref = cfg.loss.kl_coef > 0
    ref_model = None
    if use_ref and cfg.loss.ref_logprobs == "live":
        ref_model = mu.build_model(**build, activation_checkpointing=False, requires_grad=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    print0(f"model: {mu.num_params(model) / 1e6:.2f}M params, world {d.world_size}, {total_steps} steps")

    def logprobs(m, batch, entropy=False):
        return mu.sequence_logprobs(m, batch["input_ids"].to(d.device), batch["attention_mask"].to(d.device),
                                    backend=cfg.model.logprob_backend, return_entropy=entropy)

    # -----------------------------------------------------------------------------------------
    # Resume: newest complete state under ckpt/ (model, optimizer, sampler, RNG, step)
    # -----------------------------------------------------------------------------------------
    ckpt_root = os.path.join(out, "ckpt")
    step = 0
    nonfinite_total = 0
    latest = mu.latest_state(ckpt_root) if cfg.train.resume == "auto" else None
    if latest is not None:
        try:
            extra = mu.load_state(latest, model, optimizer, dist=d)
        except ValueError as e:  # e.g. saved with another world size
            raise SystemExit(f"error: cannot resume from {latest}: {e}") from None
        step, nonfinite_total = extra["step"], extra["nonfinite_total"]
        sampler.load_state_dict(extra["sampler"])
        print0(f"resumed from {latest} at step {step}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    if d.rank == 0 and os.path.exists(metrics_path):  # drop rows of steps that will be re-run
        with open(metrics_path) as f:  # (a last line torn by a kill has no newline: dropped as well)
            kept = [line for line in f if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def save(at_step: int) -> None:
        extra = {"step": at_step, "nonfinite_total": nonfinite_total, "sampler": sampler.state_dict()}
        mu.save_state(ckpt_root, at_step, model, optimizer, extra, dist=d, keep=cfg.train.keep_checkpoints)

    # -----------------------------------------------------------------------------------------
    # Cached reference log-probs: off-policy data is fixed, so log pi_ref of every teacher token is
    # computed once, before the first update (the policy IS the reference then), and no reference
    # model is held during training. One safetensors file per rank, read lazily by every rank.
    # -----------------------------------------------------------------------------------------
    ref_cache = None
    if use_ref and cfg.loss.ref_logprobs == "cached":
        from safetensors import safe_open
        from safetensors.torch import save_file
        cache_dir = os.path.join(out, "ref_logprobs")
        done_marker = os.path.join(cache_dir, "COMPLETE")
        if not os.path.exists(done_marker):
            if step > 0:
                raise SystemExit("error: resuming a cached-reference run whose ref_logprobs/ cache is incomplete")
            os.makedirs(cache_dir, exist_ok=True)
            mine = list(range(d.rank, len(dataset), d.world_size))
            n_batches = math.ceil(len(dataset) / d.world_size)  # same count on every rank (FSDP collectives)
            tensors = {}
            with torch.no_grad():
                for b in tqdm(range(n_batches), desc="ref logprobs", disable=d.rank != 0):
                    qi = mine[b] if b < len(mine) else mine[-1]
                    lp = logprobs(model, data.collate([dataset[qi]], tokenizer.pad_token_id))
                    tensors[f"q{qi}"] = lp.float().cpu().contiguous()  # [G, T-1]
            model.reshard()
            save_file(tensors, os.path.join(cache_dir, f"rank{d.rank}.safetensors"))
            dist.barrier()
            if d.rank == 0:
                open(done_marker, "w").close()
        dist.barrier()
        handles = [safe_open(os.path.join(cache_dir, f"rank{r}.safetensors"), "pt")
                   for r in range(d.world_size)]
        ref_cache = lambda qi: handles[qi % d.world_size].get_tensor(f"q{qi}")  # [G, T_q-1]

    # -----------------------------------------------------------------------------------------
    # On-policy rollouts: G samples per question from the current policy, scored by reward.py
    # -----------------------------------------------------------------------------------------
    def rollout(items: list[dict]) -> list[dict]:
        prompts = [it["prompt_ids"] for it in items for _ in range(G)]
        responses = mu.generate(model, tokenizer, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                seed=cfg.train.seed * 1_000_003 + step * d.world_size + d.rank)
        fresh = []
        for i, it in enumerate(items):
            resp = responses[i * G:(i + 1) * G]
            texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
            fresh.append({**it,
                          "input_ids": [it["prompt_ids"] + r for r in resp],
                          "loss_mask": [[0] * len(it["prompt_ids"]) + [1] * len(r) for r in resp],
                          "rewards": [reward.score(t, it["gold"]) if it["gold"] is not None else 0.0 for t in texts],
                          "texts": texts})
        return fresh

    # -----------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------
    name, lc = cfg.loss.name, cfg.loss
    nonfinite_streak = 0
    bar = tqdm(total=total_steps, initial=step, desc=name, disable=d.rank != 0, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        qidx = sampler.next_step()                                 # this rank's questions
        items = [dataset[i] for i in qidx]
        if name == "onpolicy":
            items = rollout(items)

        # N_seq over the whole step and all ranks: the one normaliser of the loss (eq. 6).
        local = sum(r > 0 for it in items for r in it["rewards"]) if name == "sft" else len(items) * G
        seq_count = torch.tensor([float(local)], dtype=torch.float64)
        dist.all_reduce(seq_count)
        num_seqs = max(seq_count.item(), 1.0)
        # The rank's groups as rows [B_rank, T]; advantages need whole groups, so they are computed here,
        # before the rows are split into micro-batches of `micro_batch_size` sequences. Micro-batches take
        # the rows in length order (less padding; the loss is a sum over rows, so any split is the same).
        full = data.collate(items, tokenizer.pad_token_id)
        rewards_all = full["rewards"].to(d.device)                                # [B_rank]
        if name == "sft":
            adv_all = torch.zeros_like(rewards_all)                                # [B_rank]
        else:
            adv_all = L.group_advantages(rewards_all, G, scale_by_std=lc.scale_by_std,
                                         all_positive_bias=lc.all_positive_bias)  # [B_rank]
        row_q = [qi for qi in qidx for _ in range(G)]                              # question of each row
        stats = torch.zeros(6, dtype=torch.float64)                # summed over micro-batches, then ranks
        lengths = full["attention_mask"].sum(1)                                    # [B_rank]
        by_length = torch.argsort(lengths, stable=True)                            # [B_rank]
        for lo in range(0, len(row_q), cfg.train.micro_batch_size):
            rows = by_length[lo:lo + cfg.train.micro_batch_size]                   # [b]
            width = int(lengths[rows].max())                                       # trim shared padding
            batch = {k: full[k][rows, :width] for k in ("input_ids", "attention_mask", "loss_mask")}
            mask = batch["loss_mask"][:, 1:].to(d.device)                          # [b, t]
            rewards, adv = rewards_all[rows], adv_all[rows]                         # [b]
            logp, entropy = logprobs(model, batch, entropy=True)                    # [b, t] each
            ref_logp = None
            if use_ref and ref_cache is not None:
                ref_logp = torch.zeros_like(logp)                                   # [b, t]
                for j, row in enumerate(rows.tolist()):
                    cached = ref_cache(row_q[row])[row % G]                         # [T_q - 1]
                    n = min(cached.shape[0], logp.shape[1])
                    ref_logp[j, :n] = cached[:n].to(d.device)
            elif use_ref:
                with torch.no_grad():
                    ref_logp = logprobs(ref_model, batch)                           # [b, t]
            if name == "sft":
                mask = mask * (rewards > 0).float()[:, None]                       # positive responses only
                token_loss = L.sft_token_loss(logp, ref_logp=ref_logp, kl_coef=lc.kl_coef)
            elif name == "offgrpo":
                token_loss = L.off_policy_grpo_token_loss(logp, adv, clip_eps=lc.clip_eps, ref_logp=ref_logp,
                                                          kl_coef=lc.kl_coef, luffy_gamma=lc.luffy_gamma)
            else:  # one update per rollout batch, so the sampling policy is the current one
                token_loss = L.on_policy_grpo_token_loss(logp, logp.detach(), adv, clip_eps=lc.clip_eps,
                                                         ref_logp=ref_logp, kl_coef=lc.kl_coef)
            loss = L.seq_mean_token_mean(token_loss, mask, num_seqs)
            if lc.entropy_coef:
                loss = loss - lc.entropy_coef * L.seq_mean_token_mean(entropy, mask, num_seqs)
            loss.backward()
            with torch.no_grad():  # sums over sequences of per-sequence means; divided by N_seq below
                stats += torch.tensor([
                    loss.item() * num_seqs,                                               # loss
                    mask.sum().item(),                                                    # response tokens
                    (adv * (mask.sum(1) > 0)).sum().item(),                               # advantage
                    L.seq_mean_token_mean(L.kl_k3(logp, ref_logp), mask, 1).item() if use_ref else 0.0,
                    L.seq_mean_token_mean(entropy, mask, 1).item(),                       # entropy
                    rewards.sum().item(),                                                 # reward
                ], dtype=torch.float64)
        all_pos = sum(all(r > 0 for r in it["rewards"]) for it in items)
        stats = torch.cat([stats, torch.tensor([float(all_pos), float(len(items))], dtype=torch.float64)])
        if ref_model is not None:
            ref_model.reshard()
        dist.all_reduce(stats)
        loss_sum, tokens, adv_sum, kl_sum, ent_sum, reward_sum, all_pos, n_q = stats.tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        step_loss = loss_sum / num_seqs
        lr = lr_at(step, cfg.optim, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            nonfinite_streak = 0
        else:
            nonfinite_streak += 1
            nonfinite_total += 1
            print0(f"step {step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; step skipped")
            if nonfinite_streak >= cfg.train.max_nonfinite:
                bar.close()  # so the message below is a line of its own
                raise SystemExit(f"error: {nonfinite_streak} non-finite steps in a row (last at step {step + 1}); aborting")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.time() - t0

        # -----------------------------------------------------------------------------------------
        # Logging, samples, checkpoints
        # -----------------------------------------------------------------------------------------
        if d.rank == 0:
            row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "seconds": seconds, "perf/tokens_per_second": tokens / max(seconds, 1e-9),
                   "policy/adv_mean": adv_sum / num_seqs, "policy/kl_mean": kl_sum / num_seqs,
                   "policy/entropy": ent_sum / num_seqs, "data/all_positive_share": all_pos / n_q,
                   "data/reward_mean": reward_sum / (n_q * G), "data/epoch": sampler.progress,
                   "loss/nonfinite_skipped": nonfinite_total}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{step_loss:.4f}", gn=f"{grad_norm:.3f}")
            bar.update(1)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0:
            if name == "onpolicy":  # the rollouts this step trained on
                shown = [{"gold": it["gold"], "rewards": it["rewards"][:2], "texts": it["texts"][:2]} for it in items[:2]]
            else:                   # a fresh greedy answer to this rank's first question (all ranks generate)
                resp = mu.generate(model, tokenizer, [items[0]["prompt_ids"]], max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=0.0, top_p=1.0, seed=cfg.train.seed)
                texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
                gold = items[0]["gold"]
                shown = [{"gold": gold, "rewards": [reward.score(texts[0], gold) if gold is not None else 0.0],
                          "texts": texts}]
            if d.rank == 0:
                with open(os.path.join(out, "samples.jsonl"), "a") as f:
                    f.writelines(json.dumps({"step": step, **s}) + "\n" for s in shown)
        flag = torch.tensor([float(stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        stop = flag.item() > 0 or step == cfg.train.stop_after
        if step % cfg.train.save_every == 0 or step == total_steps or stop:
            save(step)
        if cfg.train.hf_every and step % cfg.train.hf_every == 0:
            mu.save_hf(model, tokenizer, os.path.join(out, "hf", f"step-{step}"), dist=d)
        if stop:
            print0(f"{'SIGTERM' if flag.item() > 0 else 'train.stop_after'}: saved state at step {step}; exiting")
            mu.teardown_distributed()
            sys.exit(0)
    bar.close()

    # -----------------------------------------------------------------------------------------
    # Save: the final HF-format model
    # -----------------------------------------------------------------------------------------
    mu.save_hf(model, tokenizer, os.path.join(out, "hf", "final"), dist=d)
    print0(f"done: {step} steps; model in {os.path.join(out, 'hf', 'final')}")
    mu.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
