"""EngineConfig defaults that depend on the device."""

import pytest
import torch

from photoninfer.config import EngineConfig
from photoninfer.errors import ConfigError


def test_step_token_budget_defaults_by_device():
    config = EngineConfig()
    assert config.max_num_batched_tokens is None
    assert config.for_device(torch.device("cuda")).max_num_batched_tokens == 8192
    assert config.for_device(torch.device("cpu")).max_num_batched_tokens == 2048
    assert config.max_num_batched_tokens is None  # the caller's config is not changed


def test_explicit_step_token_budget_is_kept():
    config = EngineConfig(max_num_batched_tokens=512)
    assert config.for_device(torch.device("cuda")).max_num_batched_tokens == 512


@pytest.mark.parametrize("budget", [0, -4, 2.5])
def test_bad_step_token_budget_is_refused(budget):
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=budget).validate()


def test_kv_cache_dtype_resolves_and_refuses_unknown_names():
    from photoninfer.config import resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4").validate()
