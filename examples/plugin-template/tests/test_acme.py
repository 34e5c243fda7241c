"""The plugin's own tests: audiomoe's conformance check, through the installed entry point."""

import audiomoe
from audiomoe.testing import check_component, check_preset


def test_router_conforms():
    check_component("router", "acme_temperature")


def test_preset_trains_a_step_and_rebuilds():
    check_preset("acme-tiny-moe")


def test_listed_without_importing_the_router():
    names = [e.qualified_name for e in audiomoe.list_components("router")]
    assert "acme:acme_temperature" in names
