"""The config's cross-field checks (train.load_config calls them): validate() before the run touches output_dir,
validate_paths() for what the run needs of this machine. Each failed check is one ConfigError line
(yaml_config.need) naming the key, its value and what is valid. `cfg` is train.Config (duck-typed here: this module
does not import train)."""
import importlib.util
import os

import torch

import dpo
import loggers
from yaml_config import need


def validate(cfg) -> None:
    """Cross-field checks, before the run touches output_dir."""
    need(cfg.output_dir, "output_dir is required")
    need(cfg.loss.name in ("sft", "offgrpo", "onpolicy", "dpo", "rft"),
         f"loss.name must be sft, offgrpo, onpolicy, dpo or rft, got {cfg.loss.name!r}")
    dpo.validate(cfg)
    need(cfg.loss.ref_logprobs in ("live", "cached"), f"loss.ref_logprobs must be live or cached, got {cfg.loss.ref_logprobs!r}")
    need(not (cfg.loss.name in ("onpolicy", "rft") and cfg.loss.ref_logprobs == "cached" and cfg.loss.kl_coef > 0),
         f"loss.ref_logprobs=cached needs fixed responses; {cfg.loss.name} samples new ones -- use live")
    need(cfg.model.logprob_backend in ("auto", "triton", "torch"), "model.logprob_backend must be auto, triton or torch")
    need(cfg.model.logprob_backend != "triton" or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
         "model.logprob_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, the interpreter); use auto or torch")
    need(cfg.model.param_dtype in ("bfloat16", "float32"), "model.param_dtype must be bfloat16 or float32")
    need(cfg.train.resume in ("auto", "none"), f"train.resume must be auto or none, got {cfg.train.resume!r}")
    need((cfg.model.path is None) != (cfg.model.init_config is None), "set exactly one of model.path and model.init_config")
    need(cfg.model.tokenizer is not None or cfg.model.path is not None, "model.tokenizer is required with model.init_config")
    need(cfg.data.group_size >= 1, "data.group_size must be >= 1")
    need(cfg.loss.name in ("sft", "rft") or cfg.data.group_size >= 2, "GRPO needs data.group_size >= 2")
    need(cfg.loss.luffy_gamma is None or cfg.loss.clip_eps is None,
         "loss.luffy_gamma replaces the clip: set loss.clip_eps=null with it")
    need(cfg.train.questions_per_step >= 1 and cfg.train.micro_batch_size >= 1, "batch sizes must be >= 1")
    aggs = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
    need(cfg.loss.agg in aggs, f"loss.agg must be one of {', '.join(aggs)}, got {cfg.loss.agg!r}")
    need((cfg.loss.agg == "seq-mean-token-sum-norm") == (cfg.loss.agg_len is not None),
         "loss.agg_len is the budget of loss.agg=seq-mean-token-sum-norm: set it with that mode and only then")
    need(cfg.loss.agg_len is None or cfg.loss.agg_len >= 1, "loss.agg_len must be >= 1")
    need(cfg.loss.kl_clamp is None or cfg.loss.kl_clamp > 0, "loss.kl_clamp must be > 0 or null")
    need(cfg.data.num_questions is None or cfg.data.num_questions >= 1, "data.num_questions must be >= 1 or null")
    vc = cfg.validation
    need(vc.every_epochs >= 0, "validation.every_epochs must be >= 0")
    need(not vc.every_epochs or vc.data, "validation.every_epochs needs validation.data")
    need(vc.n >= 1 and vc.temperature >= 0 and 0 < vc.top_p <= 1 and vc.max_new_tokens >= 1,
         "validation: n >= 1, temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")
    need(vc.limit is None or vc.limit >= 1, "validation.limit must be >= 1 or null")
    need(cfg.data.overlong in ("truncate", "drop"), f"data.overlong must be truncate or drop, got {cfg.data.overlong!r}")
    need(cfg.rollout.max_batch_tokens >= 1, "rollout.max_batch_tokens must be >= 1")
    need(cfg.rollout.backend in ("hf", "vllm", "auto"),
         f"rollout.backend must be hf, vllm or auto, got {cfg.rollout.backend!r}")
    need(cfg.rollout.backend != "vllm" or cfg.model.path is not None,
         "rollout.backend=vllm starts its engine from model.path: set model.path (not model.init_config)")
    need(0 < cfg.rollout.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization must be in (0, 1]")
    need(cfg.train.collective_timeout_s >= 1, "train.collective_timeout_s must be >= 1")
    need(cfg.train.micro_batch_tokens >= 0, "train.micro_batch_tokens must be >= 0 (0 = padded micro-batches)")
    need(cfg.loss.ref_shard_every >= 1, "loss.ref_shard_every must be >= 1")
    need(cfg.train.keep_hf >= 0, f"train.keep_hf must be >= 0 (0 = every hf/step-N kept), got {cfg.train.keep_hf}")
    bad_loggers = loggers.check(cfg.train.loggers, cfg.train.wandb_mode)
    need(bad_loggers is None, bad_loggers)
    attn = ("sdpa", "eager", "flex_attention", "flash_attention_2")
    need(cfg.model.attn_implementation in attn,
         f"model.attn_implementation must be one of {', '.join(attn)}, got {cfg.model.attn_implementation!r}")


def validate_paths(cfg) -> None:
    """What the run needs of this machine: the files it reads, the vllm package for rollout.backend=vllm
    (checked before anything is written; benchmarks/memory.py rehearses configs without these checks)."""
    need(cfg.rollout.backend != "vllm" or importlib.util.find_spec("vllm") is not None,
         "rollout.backend=vllm needs the vllm package (README: vLLM); use rollout.backend=hf")
    if cfg.model.path is not None:
        need(os.path.isdir(cfg.model.path), f"model.path not found: {cfg.model.path}")
        need(os.path.isfile(os.path.join(cfg.model.path, "config.json")), f"model.path has no config.json: {cfg.model.path}")
        need(any(f.endswith(".safetensors") for f in os.listdir(cfg.model.path)),
             f"model.path has no safetensors weights: {cfg.model.path}")
    need(cfg.model.tokenizer is None or os.path.isdir(cfg.model.tokenizer), f"model.tokenizer not found: {cfg.model.tokenizer}")
    need(os.path.isfile(cfg.data.train_path), f"data.train_path not found: {cfg.data.train_path!r}")
    need(cfg.data.pass_rates is None or os.path.isfile(cfg.data.pass_rates), f"data.pass_rates not found: {cfg.data.pass_rates}")
    need(not cfg.validation.every_epochs or os.path.isfile(cfg.validation.data),
         f"validation.data not found: {cfg.validation.data!r}")
