"""Tasks: prompts with references and verifiers."""

from .base import Example, Task
from .loaders import load_task
from .world import STYLES, WorldSpec, chain_terms, generate_world, world_splits

__all__ = ["Example", "Task", "load_task", "STYLES", "WorldSpec", "chain_terms", "generate_world", "world_splits"]
