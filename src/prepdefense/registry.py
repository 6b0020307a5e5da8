"""A small name -> factory registry shared by models, defenses and attacks (timm-style)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List


class Registry:
    """Maps a name to a factory; ``create`` gives a clear error listing the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            doc = help or (factory.__doc__ or "").strip().splitlines()[0:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._factories)

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **params: Any) -> Any:
        return self.get(name)(**params)
