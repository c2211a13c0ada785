"""omni-export: a deployment compiler for omni-modal models (vision + audio + LLM + speech out)."""

__version__ = "0.2.0"
