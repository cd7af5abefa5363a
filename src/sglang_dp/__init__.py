"""sglang-dp: data-parallel front end for SGLang."""

__version__ = "0.1.0"
