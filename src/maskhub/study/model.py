"""The study's model (a Qwen2 causal LM built from a config) and its bf16 checkpoints.

Training keeps fp32 weights (the master weights); every checkpoint is written in bf16, as
RL frameworks publish them, and a run that starts from a checkpoint starts from exactly its
bf16 values (loaded into fp32), so an entry no run touches stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file

from maskhub.errors import UsageError
from maskhub.study.sizes import StudySize
from maskhub.study.task import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


def study_device() -> str:
    """Where the study trains: ``"cuda"`` when torch sees a GPU, else ``"cpu"``. Grading,
    sampling the DPO pairs and every checkpoint stay on the CPU (checkpoints are written from
    host memory); on the CPU every ``.to(study_device())`` is a no-op, so the CPU path is
    the one the determinism test covers."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config(size: StudySize) -> Any:
    """The ``Qwen2Config`` of ``size`` (untied embeddings: safetensors stores no shared
    tensors, and the paper's models have separate ``lm_head`` weights)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=size.hidden,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate,
                       max_position_embeddings=128, tie_word_embeddings=False,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def new_model(size: StudySize, seed: int) -> Any:
    """A freshly initialised fp32 model (``seed`` fixes the initialisation)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config(size))
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


def save_bf16(model: Any, directory: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``model`` as a bf16 checkpoint directory (``model.safetensors`` and
    ``config.json``, the layout ``maskhub diff`` and ``from_pretrained`` read); ``dtype``:
    another dtype (:func:`save_fp32`). A directory that cannot be written is a
    :class:`~maskhub.errors.UsageError`."""
    weights = {name: p.detach().to(dtype).contiguous().cpu()
               for name, p in model.state_dict().items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(directory)
    except (OSError, safetensors.SafetensorError) as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"cannot write the checkpoint {directory}: "
                         f"{text[0] if text else type(exc).__name__}") from None
    return directory


def save_fp32(model: Any, directory: Path) -> Path:
    """Write ``model``'s fp32 master weights as they are (the fp32 control of a run's bf16
    checkpoints), in the layout of :func:`save_bf16`."""
    return save_bf16(model, directory, torch.float32)


def load_bf16(size: StudySize, directory: Path) -> Any:
    """A fp32 model holding exactly the bf16 values of checkpoint ``directory``."""
    model = new_model(size, seed=0)
    state = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model


def n_parameters(model: Any) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
