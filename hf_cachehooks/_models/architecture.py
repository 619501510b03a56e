"""The only code that knows where a model keeps its layers, final norm and unembedding.

"Layer L" everywhere in hf_cachehooks means `output_hidden_states[L]` of the base model: 0 is the
embedding output (after any scaling the model applies), L in 1..n-1 is the output of decoder block
L-1 (that is, the input of block L), and n is the last block's output after the final norm, as
transformers returns it.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# Attribute paths tried in order: (base model, its block list, its final norm).
_LAYOUTS = (
    ("model", "layers", "norm"),  # Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM
    ("transformer", "h", "ln_f"),  # GPT-2, GPT-J, Falcon, BLOOM (h)
    ("gpt_neox", "layers", "final_layer_norm"),  # GPT-NeoX, Pythia
    ("model.decoder", "layers", "final_layer_norm"),  # OPT
    ("bert", "encoder.layer", None),  # BERT (encoders have no final norm)
    ("roberta", "encoder.layer", None),
    ("", "encoder.layer", None),  # a bare BertModel / MiniLM
    ("", "layers", "norm"),  # a bare LlamaModel
    ("", "h", "ln_f"),  # a bare GPT2Model
)


def _get(obj: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def locate(model: Any) -> tuple[Any, Any, Any]:
    """(base model, list of blocks, final norm or None) of a transformers model.

    Raises:
        ConfigError: the architecture is not one this module knows.
    """
    for base_path, blocks_path, norm_path in _LAYOUTS:
        base = _get(model, base_path)
        blocks = _get(base, blocks_path) if base is not None else None
        if blocks is not None and hasattr(blocks, "__len__") and len(blocks) > 0:
            norm = _get(base, norm_path) if norm_path else None
            return base, blocks, norm
    raise ConfigError(
        f"Cannot find the decoder blocks of {type(model).__name__}. Supported layouts: "
        "Llama/Mistral/Qwen/Gemma (model.layers), GPT-2 (transformer.h), GPT-NeoX, OPT, BERT. "
        "Add yours to hf_cachehooks/_models/architecture.py::_LAYOUTS."
    )


def num_layers(model: Any) -> int:
    """Number of decoder blocks; valid layer indices are 0..num_layers (see the module docstring)."""
    return len(locate(model)[1])


def hidden_size(model: Any) -> int:
    """Width of the hidden states (`hidden_size`, GPT-2's `n_embd` or `d_model` in the model's config)."""
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError(f"Cannot read the hidden size from {type(config).__name__}.")


def configured_layers(config: Any) -> int | None:
    """Number of blocks a model config declares, read before any weights load; None when it does not say.

    Lets a command check `--layers` against 0..n up front; `num_layers` on the loaded model is the authority.
    """
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def unembedding(model: Any) -> Any:
    """The output projection (lm_head), or None for models without one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
