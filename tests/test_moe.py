"""The graph-friendly MoE path (gathered expert weights, batched matrix-vector products, no host syncs) equals the
reference loop over chosen experts."""

import pytest
import torch

from gemma4.model.text import Experts, Router
from reference import FAMILIES
from gemma4.config import TextConfig


def tiny_config():
    data = dict(FAMILIES["26B-A4B"])
    data.pop("model_type")
    return TextConfig.from_dict(data) if hasattr(TextConfig, "from_dict") else TextConfig(**data)


@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gathered_experts_equal_loop(tokens, dtype, tolerance):
    torch.manual_seed(tokens)
    config = tiny_config()
    experts, router = Experts(config).to(dtype), Router(config).to(dtype)
    with torch.no_grad():
        for p in (*experts.parameters(), *router.parameters()):
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        x = torch.randn(tokens, config.hidden_size, dtype=dtype)
        weights, chosen = router(x)
        loop = experts.forward_loop(x, weights, chosen)
        gathered = experts.forward_gathered(x, weights, chosen)
        grouped = experts.forward_grouped(x, weights, chosen) if dtype != torch.float64 else gathered
    scale = loop.abs().max()
    assert ((loop - gathered).abs().max() / scale) <= tolerance
    assert ((loop - grouped).abs().max() / scale) <= tolerance


def test_path_switch():
    config = tiny_config()
    experts = Experts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, config.hidden_size)
    weights = torch.rand(2, config.top_k_experts)
    chosen = torch.randint(0, config.num_experts, (2, config.top_k_experts))
    experts.path = "gathered"
    a = experts(x, weights, chosen)
    experts.path = "loop"
    b = experts(x, weights, chosen)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)  # magnitudes ~1e2 with unit-scale random weights
