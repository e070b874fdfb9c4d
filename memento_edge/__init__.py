"""memento-edge: persistent semantic memory for AI agents, sized for a Raspberry Pi Zero."""
from __future__ import annotations

__version__ = "0.1.0"
