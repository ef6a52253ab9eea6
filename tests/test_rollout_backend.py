"""rollout.backend=auto (the real configs' default): vLLM on a GPU where the package is importable and the model
comes from model.path, HF otherwise, said once; hf and vllm stay as given; a misspelt backend is a config error."""
import importlib.util

import pytest

import sampling
import train


@pytest.fixture
def cfg():
    return train.load_config("configs/bias05.yaml", ["model.path=/models/x"], check_paths=False)


def test_real_configs_default_to_auto():
    for name in ("bias05", "offgrpo", "sft", "onpolicy"):
        assert train.load_config(f"configs/{name}.yaml", [], check_paths=False).rollout.backend == "auto"


def test_auto_picks_vllm_only_on_a_gpu_with_the_package(cfg, monkeypatch, capsys):
    real = importlib.util.find_spec
    have = {"vllm": True}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" and have["vllm"] else (None if name == "vllm"
                                                                                          else real(name, *a)))
    assert sampling.resolve_backend(cfg, "cuda") == "vllm"
    assert "rollout.backend=auto: vllm" in capsys.readouterr().out
    assert sampling.resolve_backend(cfg, "cpu") == "hf" and "hf (no GPU)" in capsys.readouterr().out
    have["vllm"] = False
    assert sampling.resolve_backend(cfg, "cuda") == "hf" and "hf (no vllm package)" in capsys.readouterr().out
    have["vllm"] = True
    cfg.model.path, cfg.model.init_config = None, {"hidden_size": 8}
    assert sampling.resolve_backend(cfg, "cuda") == "hf" and "model.init_config" in capsys.readouterr().out
    for given in ("hf", "vllm"):
        cfg.rollout.backend = given
        assert sampling.resolve_backend(cfg, "cuda") == given


def test_a_misspelt_backend_is_a_config_error():
    with pytest.raises(train.ConfigError, match="rollout.backend must be hf, vllm or auto, got 'vlm'"):
        train.load_config("configs/bias05.yaml", ["rollout.backend=vlm"], check_paths=False)
