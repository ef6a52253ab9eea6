"""gpu_check part 3, memory: benchmarks/memory.py's prediction against the CUDA allocator, phase by phase.

The configuration: configs/bias05.yaml (the blog's job: cached reference log-probs, activation checkpointing, bf16
compute, AdamW) on OpenThinker3-7B's shipped config.json with 2 of its 28 layers (every other shape real), 1 rank,
one sequence of 8,192 and of 32,768 tokens per micro-batch (--quick: 8,192), validation off.
Predicted: `python benchmarks/memory.py ... --world 1 --json` in its own process (fake tensors, fake process group;
started first, it runs on the CPU while the real step runs on the GPU). Measured: the same phases in this process on
the real process group (dist_utils: cpu:gloo,cuda:nccl), with train.py's own functions (train.build_models,
train.logprobs, train.micro_batch_loss) and memory.py's batch (fake_batch: the shapes it rehearses), as
torch.cuda.max_memory_allocated after reset_peak_memory_stats around each phase (persistent state included, as the
tracker's peak includes it): ref_prepass (no-grad forward, before any optimizer state, every length first),
train_step (two forward+backward with the optimizer step between them, the larger peak, as memory.py takes it),
optimizer_step (clip + AdamW step; memory.py computes it from the shards) and hf_export (every parameter gathered
in turn). The weights are the seeded HF init of the same architecture (model.init_config; values do not change
memory). max_memory_reserved (what the allocator holds, fragmentation included) is reported beside.

Tolerance: measured / predicted within [0.5, 1.10] per phase, with 0.25 GiB of absolute slack for small phases.
Above 1.10 the prediction is too optimistic for its own safety margin: memory.py subtracts a --reserve of 2 GiB for
what the tracker cannot see, ~6% of the 7B job's 34 GiB train step per rank, so an underestimate of 10% at this
depth means "fits" cannot be trusted at the real one. Below 0.5 the two measure different things (a phase missed).
"""
import json
import os
import subprocess
import sys

import torch

from benchmarks.gpu_check import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/bias05.yaml"
SHIPPED = os.path.join(ROOT, "configs", "models", "OpenThinker3-7B", "config.json")
RATIO_LO, RATIO_HI, SLACK_GIB = 0.5, 1.10, 0.25
TINY_MODEL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
NOT_CONFIG = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


def model_config(args):
    if args.tiny:
        return dict(TINY_MODEL)
    with open(SHIPPED) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    return cfg


def lengths(args):
    if args.tiny:
        return [256, 1024]
    return [8192] + ([] if args.quick else [32768])


def overrides(model_dir, n):
    return [f"model.path={model_dir}", f"data.max_len={n}", "train.micro_batch_size=1", "train.micro_batch_tokens=0",
            "validation.every_epochs=0"]


def start_rehearsals(args, model_dir, gpu_gib):
    """One memory.py process per length, all started now (CPU only: the GPU hidden from them)."""
    procs = {}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)  # (fake tensors launch nothing; memory.py runs as on any CPU)
    for n in lengths(args):
        out = os.path.join(model_dir, f"predicted-{n}.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "memory.py"), CONFIG, *overrides(model_dir, n),
               "--world", "1", "--gpu-memory", f"{gpu_gib:.1f}", "--json", out]
        procs[n] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True), out)
    return procs


def collect(procs, rep):
    predicted = {}
    for n, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        print(stdout + stderr[-3000:], file=sys.stderr, flush=True)
        ok = proc.returncode in (0, 1) and os.path.isfile(out)  # 1: "does not fit", still a prediction
        rep.check(f"memory.py N={n} ran", ok, returncode=proc.returncode, stderr=stderr[-500:])
        if ok:
            with open(out) as f:
                predicted[n] = {name: p["peak_gib"] for name, p in json.load(f)["phases"].items()}
    return predicted


class Phase:
    """with Phase(device) as p: ...; p.gib, p.reserved_gib -- the allocator's peak during the block (None on CPU)."""

    def __init__(self, device):
        self.device, self.gib, self.reserved_gib = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / common.GIB
            self.reserved_gib = torch.cuda.max_memory_reserved(self.device) / common.GIB
        return False


def real_phases(args, model_dir, arch):
    """{N: {phase: (allocated GiB, reserved GiB)}} of the real run (module docstring)."""
    import dist_utils
    import train
    from benchmarks import memory as bm

    d = dist_utils.setup_distributed()
    cfg = train.load_config(os.path.join(ROOT, CONFIG), overrides(model_dir, lengths(args)[0]), check_paths=False)
    cfg.model.path, cfg.model.init_config = None, {k: v for k, v in arch.items() if k not in NOT_CONFIG}
    model, _, optimizer = train.build_models(cfg, d)
    out = {n: {} for n in lengths(args)}
    for n in lengths(args):  # every reference pre-pass before any optimizer state, as the job does
        cfg.data.max_len = n
        with Phase(d.device) as p, torch.no_grad():
            train.logprobs(cfg, d, model, bm.fake_batch(cfg, bm.micro_batch_lengths(cfg)))
        out[n]["ref_prepass"] = (p.gib, p.reserved_gib)
    for n in lengths(args):
        cfg.data.max_len = n
        steps, opt = [], []
        for _ in range(2):
            train_step_once(cfg, d, model, optimizer, bm, steps, opt)
        out[n]["train_step"] = max(steps, key=lambda x: x[0] or 0)
        out[n]["optimizer_step"] = max(opt, key=lambda x: x[0] or 0)
    with Phase(d.device) as p:
        for prm in model.parameters():
            full = prm.full_tensor()
            del full
    for n in out:
        out[n]["hf_export"] = (p.gib, p.reserved_gib)
    dist_utils.teardown_distributed()
    return out


def train_step_once(cfg, d, model, optimizer, bm, steps, opt):
    """One forward+backward of memory.py's largest micro-batch, then the clip and the AdamW step, each measured."""
    import train
    sizes = bm.micro_batch_lengths(cfg)
    batch = bm.fake_batch(cfg, sizes)
    ones = torch.ones(len(sizes), device=d.device)  # adv, rewards [b]
    n = float(cfg.train.questions_per_step * cfg.data.group_size)
    counts = train.StepCounts(num_seqs=n, num_tokens=n * cfg.data.max_len)
    rows = [(0, j, s) for j, s in enumerate(sizes)]
    with Phase(d.device) as p:
        loss, _ = train.micro_batch_loss(cfg, d, model, None, bm.ZeroRefCache(), batch, ones, ones, rows, counts)
        loss.backward()
    steps.append((p.gib, p.reserved_gib))
    with Phase(d.device) as p:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    opt.append((p.gib, p.reserved_gib))
    del loss


def compare(rep, predicted, measured):
    table, worst = {}, None
    for n, phases in measured.items():
        for name, (got, reserved) in phases.items():
            pred = predicted.get(n, {}).get(name)
            ratio = None if got is None or not pred else got / pred
            table[f"{name}@{n}"] = {"predicted_gib": pred, "measured_gib": got, "reserved_gib": reserved,
                                    "ratio": ratio}
            if ratio is None:
                continue
            ok = RATIO_LO * pred - SLACK_GIB <= got <= RATIO_HI * pred + SLACK_GIB
            rep.check(f"{name} N={n}", ok, predicted_gib=pred, measured_gib=got, ratio=ratio,
                      tol=[RATIO_LO, RATIO_HI], slack_gib=SLACK_GIB)
            if worst is None or abs(ratio - 1) > abs(worst[1] - 1):
                worst = (f"{name}@{n}", ratio)
    return table, worst


def body(args, rep):
    device = torch.device(args.device)
    model_dir = os.path.abspath(os.path.join(args.out, "memory_model"))
    os.makedirs(model_dir, exist_ok=True)
    arch = model_config(args)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **arch}, f)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / common.GIB if device.type == "cuda" else 80.0
    procs = start_rehearsals(args, model_dir, gpu_gib)
    try:
        measured = real_phases(args, model_dir, arch)
    finally:
        predicted = collect(procs, rep)
    table, worst = compare(rep, predicted, measured)
    rep.data.update(phases=table, tolerance={"ratio": [RATIO_LO, RATIO_HI], "slack_gib": SLACK_GIB})
    rep.check("every phase predicted", all(v["predicted_gib"] is not None for v in table.values()))
    cells = [f"{k} {v['predicted_gib']:.1f}->{v['measured_gib']:.1f} GiB" for k, v in table.items()
             if v["measured_gib"] is not None and v["predicted_gib"] is not None]
    if not cells:
        return f"predicted {len(table)} phases; nothing measured on {device.type} (no allocator statistics)"
    return f"predicted->measured: {'; '.join(cells)}; worst ratio {worst[1]:.2f} ({worst[0]})"


if __name__ == "__main__":
    common.run("memory", body)
