"""The length-generalisation study: ``python -m fused_posenc.study`` (see :mod:`fused_posenc.study.cli`)."""
