"""Run by tests/test_vllm.py in the vLLM environment (a world of 1): an FSDP2 policy built from a model dir, a
vLLM engine from the same dir; the policy's weights are perturbed, then synced into the engine. Prints JSON:
greedy answers of the engine before and after the sync and of the policy itself (model_utils.generate)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import dist_utils  # noqa: E402
import model_utils as mu  # noqa: E402
from vllm_engine import VllmRollout  # noqa: E402


def main(model_dir):
    d = dist_utils.setup_distributed()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = mu.build_model(path=model_dir, init_config=None, dist=d, param_dtype=torch.float32,
                           reduce_dtype=torch.float32, activation_checkpointing=True)
    recs = [json.loads(line) for line in (Path(model_dir) / "data.jsonl").read_text().splitlines()]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for r in recs]
    engine = VllmRollout(model_dir, seed=0, max_model_len=512)
    greedy = dict(max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0)
    before = engine.generate(prompts, **greedy)
    torch.manual_seed(1)
    with torch.no_grad():  # a different policy: every shard moved by noise of the weights' own scale
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(torch.randn_like(local) * 0.2)
    policy = mu.generate(model, tok, prompts, **greedy)
    loaded = engine.sync(model)
    after = engine.generate(prompts, **greedy)
    eos = tok.eos_token_id
    trim = lambda rs: [r[:r.index(eos) + 1] if eos in r else r for r in rs]  # noqa: E731
    print(json.dumps({"before": trim(before), "after": trim(after), "policy": trim(policy), "loaded": loaded,
                      "params": len(list(model.parameters()))}))
    dist_utils.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
