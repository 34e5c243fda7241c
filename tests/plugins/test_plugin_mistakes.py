"""A plugin author's usual mistakes get errors that name the component and the rule, before or at run time.

Each plugin here is a real distribution (``install_dist``: a ``*.dist-info`` with entry points on
``sys.path``), found by pluggy through ``importlib.metadata`` as a pip-installed one is.
"""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe import AudioMoEError
from audiomoe.cli import main
from audiomoe.testing import ConformanceError, check_component

MISTAKES = '''
"""Routers and a scorer with the mistakes plugin authors make."""
import torch
from pydantic import Field
import audiomoe
from audiomoe.routers.functional import make_routing
from audiomoe.routers.scorers.mlp import LinearScorer


class _Base(audiomoe.Router):
    """A linear gate and a top-1 pick."""

    class Params(audiomoe.Params):
        k: int = Field(1, ge=1, description="experts per token")

    def __init__(self, params, *, d_model, num_experts):
        super().__init__(params)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs, item_mask=None, task_ids=None):
        logits = self.gate(inputs)
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.argmax(-1, keepdim=True), True)
        if item_mask is not None:
            mask &= item_mask[:, None]
        w = logits.softmax(-1) * mask
        return make_routing(logits, mask, w, item_mask=item_mask)


class BadDefault(_Base):
    """Its default k breaks its own limit."""

    class Params(audiomoe.Params):
        k: int = Field(0, ge=1, description="experts per token")


class Picky(_Base):
    """Refuses k above the expert count with a ValueError, as plain Python code does."""

    def __init__(self, params, *, d_model, num_experts):
        if params.k > num_experts:
            raise ValueError(f"k={params.k} is larger than num_experts={num_experts}")
        super().__init__(params, d_model=d_model, num_experts=num_experts)


class FloatMask(_Base):
    """Returns a float mask."""

    def forward(self, inputs, item_mask=None, task_ids=None):
        r = super().forward(inputs, item_mask, task_ids)
        r.mask = r.mask.float()
        return r


class BadIndices(_Base):
    """Lists a column that does not exist."""

    def forward(self, inputs, item_mask=None, task_ids=None):
        r = super().forward(inputs, item_mask, task_ids)
        r.indices = torch.full_like(r.indices, r.mask.shape[1])
        return r


class WideScorer(LinearScorer):
    """A scorer giving one column too many."""

    def forward(self, inputs, item_mask=None, task_ids=None):
        logits = super().forward(inputs, item_mask, task_ids)
        return torch.cat([logits, logits[:, :1]], -1)


@audiomoe.hookimpl
def audiomoe_register_components(register):
    for name in ("BadDefault", "Picky", "FloatMask", "BadIndices"):
        register("router", name.lower(), f"oops_plugin:{name}", "a router with a mistake")
    register("scorer", "wide", "oops_plugin:WideScorer", "a scorer with one column too many")
'''


@pytest.fixture
def oops(install_dist):
    install_dist("oops-plugin", "0.3.0", {"oops": "oops_plugin"}, {"oops_plugin": MISTAKES})
    assert audiomoe.get_registry().plugins["oops"].status == "loaded"


def test_a_default_that_breaks_its_own_limit_is_refused_at_validate_naming_the_key(oops, capsys):
    assert main(["validate", "tiny-moe-cls", "--set", "backbone.moe.router=baddefault"]) == 2
    err = capsys.readouterr().err
    assert "backbone.moe.router.k" in err and "greater than or equal to 1" in err
    with pytest.raises(ConformanceError, match="does not build"):
        check_component("router", "baddefault")
    assert main(["describe", "router/baddefault"]) == 0
    assert "problem: its defaults do not validate" in capsys.readouterr().out


def test_a_constructor_valueerror_is_a_config_error_naming_the_component_and_where(oops, capsys):
    assert (
        main(["validate", "tiny-moe-cls", "--set", "backbone.moe.router=picky", "--set", "backbone.moe.router.k=9"])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "router 'picky' (oops 0.3.0) at 'backbone.moe.router' refused its params: k=9 is larger than num_experts=4"
        in err
    )
    assert "--set backbone.moe.router.<param>=" in err and "unexpected error" not in err
    audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=picky", "backbone.moe.router.k=2"])  # in range: builds


def _batch(model):
    sr = int(model.encoder.sample_rate)
    tasks = model.task_names
    return audiomoe.AudioBatch(torch.randn(2, sr // 2), sr, [tasks[0]] * 2, torch.tensor([sr // 2, sr // 3]), [0, 1])


def test_a_router_breaking_the_routing_contract_at_run_time_is_named(oops):
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=floatmask"])
    with pytest.raises(
        AudioMoEError,
        match=r"router 'floatmask' \(oops 0.3.0\) at 'backbone.moe.router' broke the Routing contract: routing.mask must be bool, got torch.float32",
    ):
        model(_batch(model))
    with pytest.raises(ConformanceError, match="routing.mask must be bool"):
        check_component("router", "floatmask")


def test_indices_outside_the_columns_fail_the_conformance_check(oops):
    with pytest.raises(ConformanceError, match=r"routing.indices must be column ids in \[0, 4\)"):
        check_component("router", "badindices", context={"num_experts": 4})
    check_component("router", "picky")  # the same router without the mistake passes


def test_a_scorer_is_checked_against_the_router_contract_through_the_composite(oops):
    with pytest.raises(
        ConformanceError,
        match="as the scorer of router 'scored': WideScorer logits have 5 columns, expected num_experts=4",
    ):
        check_component("scorer", "wide")
    check_component("scorer", "linear")
