"""Resolve a model spec from a config or the command line: a zoo name, ``module:function`` or a folder."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from shiftkit.errors import ShiftkitError

__all__ = ["resolve_model"]


def resolve_model(spec: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Build the model named by ``spec``.

    Args:
        spec: a zoo model name (``"minilm"``), ``"package.module:function"`` (your code; the function returns
            a module or ``(module, tokenizer)``), or a Hugging Face model folder.
        **kwargs: passed to the zoo loader or the function.

    Returns:
        ``(model, tokenizer_or_None)``.

    Example:
        >>> model, tok = resolve_model("minilm")
        >>> model, _ = resolve_model("mypkg.models:build", width=64)
    """
    from shiftkit import zoo

    if ":" in spec and not Path(spec).exists():
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ShiftkitError(f"cannot load model factory {spec!r}: {err}") from None
        out = fn(**kwargs)
    elif Path(spec).is_dir():
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(spec, **kwargs)
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError):
            tok = None
        out = (model, tok)
    else:
        out = zoo.load_model(spec, **kwargs)
    if isinstance(out, nn.Module):
        return out, None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        return out[0], out[1]
    raise ShiftkitError(
        f"model spec {spec!r} returned {type(out).__name__}, not a module or (module, tokenizer)"
    )
