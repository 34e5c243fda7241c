"""Every registered component and every preset passes the conformance check (timm-style).

Parametrised over the registry itself: a component added by any plugin is tested for free.
"""

from __future__ import annotations

import pytest

import audiomoe
from audiomoe.testing import check_component, check_preset

COMPONENTS = [(e.kind, e.name) for e in audiomoe.list_components()]
PRESETS = [p.name for p in audiomoe.list_presets()]
audiomoe.reset_registry()


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}/{n}" for k, n in COMPONENTS])
def test_component_conforms(kind, name):
    report = check_component(kind, name)
    assert report.checks[0] == "builds from params"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_a_step_and_rebuilds(name):
    from audiomoe.encoders.hf_common import MissingPretrainedError

    try:
        report = check_preset(name)
    except MissingPretrainedError as exc:  # presets of real checkpoints (mowe-audio) need local weights
        pytest.skip(f"local weights missing: {str(exc).splitlines()[0]}")
    assert "compose(model.spec) rebuilds identical parameters" in report.checks


def test_conformance_catches_a_broken_router():
    import types

    import torch

    from audiomoe import Registry, Router, Routing
    from audiomoe.testing import ConformanceError

    class LeakyRouter(Router):
        """Routes padded items too: must be caught."""

        def __init__(self, params, *, num_experts):
            super().__init__(params)
            self.w = torch.nn.Parameter(torch.zeros(num_experts))

        def forward(self, inputs, item_mask=None, task_ids=None):
            n = inputs.shape[0]
            w = self.w.softmax(-1).expand(n, -1)
            mask = torch.ones_like(w, dtype=torch.bool)
            return Routing(w, mask, w, torch.zeros(n, 1, dtype=torch.long), mask.sum(0))

    mod = types.ModuleType("leaky_mod")
    mod.__doc__ = "A router that forgets the padding mask."
    LeakyRouter.__module__ = "leaky_mod"
    mod.LeakyRouter = LeakyRouter
    import sys

    sys.modules["leaky_mod"] = mod
    plugin = types.ModuleType("leaky_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("router", "leaky", "leaky_mod:LeakyRouter", "")

    plugin.audiomoe_register_components = audiomoe_register_components
    try:
        with pytest.raises(ConformanceError, match="padded items must select nothing"):
            check_component("router", "leaky", registry=Registry.isolated(plugin))
    finally:
        del sys.modules["leaky_mod"]
