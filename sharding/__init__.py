"""Mesh, logical-axis rules and placement. The only package that names physical mesh axes."""

from sharding.context import active, constrain, routed_experts, use

__all__ = ["active", "constrain", "routed_experts", "use"]
