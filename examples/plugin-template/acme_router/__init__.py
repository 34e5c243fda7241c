"""audiomoe plugin ``acme``: registers one router and one preset.

Only import strings are registered here, so ``audiomoe list`` stays fast: the router module (and
torch) is imported when the router is actually built.
"""

import audiomoe


@audiomoe.hookimpl
def audiomoe_register_components(register):
    """Register the acme router."""
    register(
        "router",
        "acme_temperature",
        "acme_router.router:TemperatureTopK",
        "Top-k with a learned temperature per expert",
    )


@audiomoe.hookimpl
def audiomoe_register_presets(register):
    """A preset that uses the acme router inside the built-in tiny MoE model."""
    register(
        "acme-tiny-moe",
        {
            "d_model": 32,
            "encoder": {"name": "conv_frontend", "params": {"dim": 32, "channels": 32}},
            "backbone": {
                "name": "moe_transformer",
                "params": {
                    "num_layers": 1,
                    "moe": {
                        "name": "moe",
                        "params": {"num_experts": 4, "router": {"name": "acme_temperature", "params": {"k": 1}}},
                    },
                },
            },
            "tasks": {"cls": {"name": "classification", "params": {"num_classes": 3}}},
        },
        "tiny MoE classifier routed by the acme router",
    )
