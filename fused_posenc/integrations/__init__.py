"""Integrations with other libraries (optional dependencies, imported on use):
``fused_posenc.integrations.transformers`` (Hugging Face models; ``pip install -e .[hf]``)."""
