"""Where FFNs, routers and SSM mixers live, per model family (see `Adapter`, `locate`)."""

from workbench.adapters.base import GATED, PLAIN, Adapter, FFNSite, Layout, MixerSite, RouterSite
from workbench.adapters.registry import adapter_for, locate, register_adapter, registered_adapters

__all__ = [
    "GATED", "PLAIN", "Adapter", "FFNSite", "Layout", "MixerSite", "RouterSite", "adapter_for",
    "locate", "register_adapter", "registered_adapters",
]
