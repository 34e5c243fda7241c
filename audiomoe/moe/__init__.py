"""The MoE layer: router + grouped experts, its dispatch plans and expert parallelism."""
