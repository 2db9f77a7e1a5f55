"""The paper's architectures, built as flat chains so that METHOD.md's generalized-layer indices hold."""

from pipeline.models.registry import ModelSpec, build_model, PAPER_ARCHS, STANDARD_LAYERS

__all__ = ["ModelSpec", "build_model", "PAPER_ARCHS", "STANDARD_LAYERS"]
