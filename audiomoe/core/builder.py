"""Step 3 of the composer, for one component: a :class:`Builder` that constructs a resolved component.

The composer (:mod:`.composer`) resolves a spec into nodes; a parent receives one Builder per child
slot and calls it with the sizes only it knows (``d_model``, ``num_experts``), as often as it needs
instances. The constructor's keyword arguments are filled from the child builders and those sizes;
each built module records where it came from (:class:`ComponentInfo`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from audiomoe.core.errors import AudioMoEError, constructor_error

if TYPE_CHECKING:
    from audiomoe.core.composer import Node


@dataclass(frozen=True)
class ComponentInfo:
    """Where a built part came from: kind, registry name, plugin (and version), dotted path."""

    kind: str
    name: str
    plugin: str
    version: str
    path: str


class Builder:
    """Builds a fresh instance of one resolved component; call it with the sizes it needs.

    A parent receives one Builder per child slot and calls it as often as it needs instances
    (an MoE layer builds ``num_experts`` experts from one expert Builder)::

        self.router = router(d_model=d_model, num_experts=num_experts)
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.children = {slot: builders(child) for slot, child in node.children.items()}

    @property
    def name(self) -> str:
        """The component's registry name."""
        return self.node.name

    @property
    def cls(self) -> type:
        """The component's class."""
        return self.node.cls

    def __repr__(self) -> str:
        return f"Builder({self.node.kind}:{self.node.name})"

    def __call__(self, **context: Any) -> Any:
        """Build the component; keyword arguments are the sizes its constructor may ask for."""
        cls: Any = self.node.cls
        sig = inspect.signature(cls.__init__)
        kwargs: dict[str, Any] = {}
        takes_var_kw = False
        for pname, p in list(sig.parameters.items())[2:]:  # self, params
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                takes_var_kw = True
            elif pname in self.children:
                kwargs[pname] = self.children[pname]
            elif pname in context:
                kwargs[pname] = context[pname]
            elif p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_POSITIONAL:
                raise AudioMoEError(
                    f"{self.node.kind} '{self.node.name}' at '{self.node.path}' needs '{pname}', which its parent "
                    f"does not provide (it provides: {', '.join(sorted(context)) or 'nothing'})"
                )
        if takes_var_kw:
            kwargs.update({k: v for k, v in context.items() if k not in kwargs})
        e = self.node.entry
        try:
            module = cls(self.node.params.model_copy(deep=True), **kwargs)
        except AudioMoEError:  # a child's builder already named its component
            raise
        except Exception as exc:
            raise constructor_error(e.kind, self.node.name, e.plugin, e.version, self.node.path, exc) from exc
        module.audiomoe_component = ComponentInfo(e.kind, self.node.name, e.plugin, e.version, self.node.path)
        return module


def builders(child: Any) -> Any:
    """A :class:`Builder` per resolved child: one, a list or a dict of them, as the slot holds (None stays None)."""
    if child is None:
        return None
    if isinstance(child, list):
        return [Builder(c) for c in child]
    if isinstance(child, dict):
        return {k: Builder(c) for k, c in child.items()}
    return Builder(child)
