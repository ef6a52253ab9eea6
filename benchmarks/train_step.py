"""Tokens per second of one training micro-step (forward + backward of the off-policy GRPO loss with KL),
measured in one run for four variants, reported as ratios:

    log-probs:  fused (fused_logprob, chunked / Triton)  vs  naive (full logits -> log_softmax -> gather)
    reference:  cached (ref_logp read from memory)       vs  live (a frozen reference model's forward)

    python benchmarks/train_step.py [--hidden 256 --layers 4 --vocab 32768 --batch 8 --seq 512 --iters 5]

Single process (world 1, still FSDP2-wrapped, as train.py runs). The vocabulary is set large on purpose:
the [tokens, vocab] logits are what the fused path avoids.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import loss as L  # noqa: E402
import dist_utils
import model_utils as mu  # noqa: E402


def naive_logprobs(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [B, T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]           # [B, T-1]


def main():
    ap = cli.ArgumentParser(prog="train_step.py", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    for flag in ("--layers", "--vocab", "--batch", "--iters"):
        if getattr(a, flag[2:]) < 1:
            cli.fail("train_step.py", f"{flag} {getattr(a, flag[2:])}: must be >= 1")
    if a.hidden < 8 or a.hidden % 8:
        cli.fail("train_step.py", f"--hidden {a.hidden}: must be a positive multiple of 8 (4 heads of even size)")
    if a.seq < 2:
        cli.fail("train_step.py", f"--seq {a.seq}: must be >= 2 (a next-token log-prob needs two tokens)")
    d = dist_utils.setup_distributed()
    cfg = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_hidden_layers=a.layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.seq, tie_word_embeddings=False)
    build = dict(path=None, init_config=cfg, dist=d, param_dtype=torch.float32, reduce_dtype=torch.float32,
                 activation_checkpointing=False)
    model = mu.build_model(**build)
    ref = mu.build_model(**build, requires_grad=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(d.device)       # [B, T]
    mask = torch.ones_like(ids)                                                         # [B, T]
    adv = torch.randn(a.batch, generator=g).to(d.device)                                # [B]
    cached = torch.randn(a.batch, a.seq - 1, generator=g).to(d.device) - 5              # [B, T-1]

    def step(fused: bool, live_ref: bool):
        logp = mu.sequence_logprobs(model, ids, mask) if fused else naive_logprobs(model, ids, mask)
        if live_ref:
            with torch.no_grad():
                ref_logp = mu.sequence_logprobs(ref, ids, mask)
        else:
            ref_logp = cached
        token_loss = L.off_policy_grpo_token_loss(logp, adv, ref_logp=ref_logp, kl_coef=0.1)
        L.seq_mean_token_mean(token_loss, mask[:, 1:].float(), a.batch).backward()
        model.zero_grad(set_to_none=True)

    variants = {"fused + cached ref": (True, False), "naive + cached ref": (False, False),
                "fused + live ref": (True, True), "naive + live ref": (False, True)}
    tps = {}
    for name, (fused, live) in variants.items():
        step(fused, live)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.iters):
            step(fused, live)
        tps[name] = a.iters * a.batch * a.seq / (time.perf_counter() - t0)
    if d.rank == 0:
        print(f"model {mu.num_params(model) / 1e6:.1f}M params, vocab {a.vocab}, batch {a.batch} x {a.seq} tokens, "
              f"{torch.get_num_threads()} threads, device {d.device}")
        for name, v in tps.items():
            print(f"  {name:20s} {v:10.0f} tokens/s")
        print(f"fused / naive   (cached ref): {tps['fused + cached ref'] / tps['naive + cached ref']:.2f}x")
        print(f"fused / naive   (live ref):   {tps['fused + live ref'] / tps['naive + live ref']:.2f}x")
        print(f"cached / live   (fused):      {tps['fused + cached ref'] / tps['fused + live ref']:.2f}x")
    dist_utils.teardown_distributed()


if __name__ == "__main__":
    main()
