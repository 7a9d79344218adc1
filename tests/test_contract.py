"""One contract over every registered merge method: inputs unchanged, a module out, info present, deterministic.

A new method is covered by registering it; if it needs more than models and labelled data, add its extra
options to ``EXTRA``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergelab
from mergelab.merge import METHODS, list_methods
from mergelab.merge.registry import MergeResult
from mergelab.models import build_model

SHAPE = (1, 4, 4)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, 3, width=8, depth=2).eval()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *SHAPE, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 64, 32)]


# Options a method needs beyond models and data (task vectors need the base they were fine-tuned from; MuDSC's
# alpha search is cut to two candidates to keep the test cheap).
EXTRA: dict[str, dict[str, object]] = {
    "task_arithmetic": {"base": _mlp(9)},
    "ties": {"base": _mlp(9)},
    "dare": {"base": _mlp(9)},
    "mudsc": {"alphas": (0.3, 0.7)},
}


def _snapshot(models: list[nn.Module]) -> list[tuple[dict[str, torch.Tensor], list[bool]]]:
    return [
        ({k: v.clone() for k, v in m.state_dict().items()}, [mod.training for mod in m.modules()])
        for m in models
    ]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_keeps_the_contract(method: str) -> None:
    models, data = [_mlp(0), _mlp(1)], _data()
    extra = EXTRA.get(method, {})
    before = _snapshot(models)
    result = mergelab.merge(models, method=method, data=data, return_info=True, **extra)
    for m, (sd, modes) in zip(models, before, strict=True):  # inputs untouched: weights, buffers, train mode
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items()), method
        assert [mod.training for mod in m.modules()] == modes, method
    assert isinstance(result, MergeResult) and isinstance(result.model, nn.Module)
    assert result.model not in models
    assert result.info["method"] and result.info["seconds"]["total"] >= 0.0
    assert result.model(data[0][0]).shape == (32, 3)
    again = mergelab.merge(models, method=method, data=data, **extra)  # the default: the model, as before
    assert isinstance(again, nn.Module) and _same_state(again, result.model)  # deterministic
    assert METHODS[method].summary and all(o.help for o in METHODS[method].options), method
