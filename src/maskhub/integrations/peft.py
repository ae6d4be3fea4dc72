"""A PEFT bridge: a mask's subnetwork as a SHiRA adapter, and back.

SHiRA (``peft.ShiraConfig``, PEFT's sparse high-rank adapter) trains a vector of values at
fixed ``(row, column)`` indices of each ``nn.Linear`` weight, added to the frozen weight as
a sparse delta. :func:`shira_adapter` builds one whose indices are exactly a mask's True
entries, with the mask's own count per layer (PEFT alone sizes every layer at
``r * (m + n)`` entries)::

    from maskhub.integrations.peft import load_shira_adapter, mask_from_adapter, shira_adapter

    peft_model = shira_adapter(model, "tulu-dpo")     # a registry name, a Mask, a Hub repo...
    ...                                               # train it like any PeftModel
    peft_model.save_pretrained("adapter/")            # adapter_config.json records the mask
    reloaded = load_shira_adapter(fresh_model, "adapter/")
    bits = mask_from_adapter(reloaded)                # {weight name: bool array}

Trained with Adam (no weight decay), the adapter follows the same path as the dense model
under :func:`maskhub.torch.apply_mask`, up to float rounding, with optimizer state for the
subnetwork only.

Not covered: masked entries of anything but an ``nn.Linear`` weight (embeddings, norms,
biases, ``Conv1D``/``Conv2d``), weights shared by several modules (tied embeddings), and
Linear layers with one input or one output (SHiRA cannot be built on them). They are left
frozen and named in one warning (``strict=True``: a :class:`~maskhub.errors.UsageError`).
Needs ``pip install 'maskhub[peft]'`` (or the ``train`` extra); tested with peft 0.21.
"""

from __future__ import annotations

import json
import os
import types
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskhub.errors import MaskMismatchError, UsageError
from maskhub.schemas.metadata import BITORDER
from maskhub.training.masking import NameMap, listing, match_parameters, resolve_mask

try:
    from peft import PeftModel, ShiraConfig, get_peft_model
    from peft.tuners.shira.layer import ShiraLayer
    from peft.utils import set_peft_model_state_dict
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("maskhub.integrations.peft needs peft>=0.17: "
                      "pip install 'maskhub[peft]'") from exc

#: ``mask_type`` of the adapters built here: this prefix, then the mask's identity as JSON.
MASK_TYPE_PREFIX = "maskhub:"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: The prefix of adapter tensor names in a saved PEFT adapter file.
SAVED_PREFIX = "base_model.model."
INDICES_SUFFIX = ".shira_indices"
WEIGHT_SUFFIX = ".shira_weight"


@contextmanager
def _quiet_mask_type() -> Iterator[None]:
    """ShiraConfig warns that any ``mask_type`` but "random" needs a ``mask_fn``: here none is
    needed (the indices are set per layer), so that warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*mask_type.*is not recognized")
        yield


def _identity(source: Any) -> dict[str, str | None]:
    """The mask's id, name and Hub repo/revision, as far as its source knows them."""
    row = getattr(source, "row", None)
    if isinstance(row, Mapping):  # a registered mask (maskhub.Mask)
        return {"id": row.get("id"), "name": row.get("name"),
                "hub_repo": row.get("hub_repo"), "hub_revision": row.get("hub_revision")}
    store = getattr(source, "store", None)
    metadata = getattr(store, "metadata", None)
    if metadata is not None:  # a mask store directory read without a registry
        return {"id": metadata.id, "name": metadata.name, "hub_repo": metadata.hub_repo,
                "hub_revision": metadata.hub_revision}
    return {"id": None, "name": getattr(source, "name", None), "hub_repo": None,
            "hub_revision": None}


def _mask_type(identity: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in identity.items() if v is not None}
    return MASK_TYPE_PREFIX + json.dumps(kept, sort_keys=True, separators=(",", ":"))


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each parameter (by id): every ``(module name, module, attribute)`` holding it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((mod_name, module, attr))
    return owners


def _selected(name: str, target_modules: str | list[str] | None) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry the name or a
    suffix after a dot."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        import re

        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def save_pretrained(self: PeftModel, save_directory: str | os.PathLike[str], *args: Any,
                    save_embedding_layers: bool | str = False, **kwargs: Any) -> None:
    """``PeftModel.save_pretrained`` with ``save_embedding_layers=False`` by default.

    PEFT's default ("auto") copies the whole base ``lm_head`` / ``embed_tokens`` matrices into
    the adapter file whenever one of them is a target, which a SHiRA delta on ``lm_head``
    makes it: the file would be the size of the embeddings. Pass
    ``save_embedding_layers=True`` after resizing the vocabulary."""
    type(self).save_pretrained(self, save_directory, *args,
                               save_embedding_layers=save_embedding_layers, **kwargs)


def _build(model: nn.Module, indices: Mapping[str, torch.Tensor], config: ShiraConfig,
           adapter_name: str) -> PeftModel:
    """Wrap ``model`` in a SHiRA PeftModel on the modules of ``indices`` (``{module name:
    (2, k) tensor of (row, column)}``), each with exactly those k trainable entries.

    PEFT builds each layer with ``r * (in + out)`` entries (``r=1``, no mask function: no
    indices); the layer's weight vector and indices are then replaced by the exact ones,
    keeping the device, dtype and trainability PEFT gave them."""
    config.r = 1
    config.target_modules = sorted(indices)
    config.mask_fn = None
    with _quiet_mask_type():
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    base = peft_model.get_base_model()
    built = {n for n, m in base.named_modules() if isinstance(m, ShiraLayer)
             and adapter_name in m.shira_weight}
    if built != set(indices):
        raise UsageError("PEFT put SHiRA layers on other modules than the mask's: "
                         + listing(sorted(built ^ set(indices))))
    for name, idx in indices.items():
        layer = base.get_submodule(name)
        old = layer.shira_weight[adapter_name]
        weight = torch.zeros(idx.shape[1], dtype=old.dtype, device=old.device)
        layer.shira_weight[adapter_name] = nn.Parameter(weight, requires_grad=old.requires_grad)
        layer.shira_indices[adapter_name] = idx.to(device=old.device, dtype=torch.int)
    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    return peft_model


def shira_adapter(model: nn.Module, mask: Any, *, home: str | os.PathLike[str] | None = None,
                  adapter_name: str = "default", target_modules: str | list[str] | None = None,
                  task_type: str | None = None, strict: bool = False,
                  strip_prefix: str | None = None, add_prefix: str | None = None,
                  name_map: NameMap | None = None, extra: str = "error") -> PeftModel:
    """Wrap ``model`` in a SHiRA ``PeftModel`` whose trainable entries are exactly the True
    entries of ``mask`` on each ``nn.Linear`` weight, with the mask's own count per layer.

    ``mask``: a :class:`~maskhub.Mask`, a registry name or id prefix (at ``home``), a Hub repo
    id, a mask store path or ``{name: bool array}`` (see :func:`maskhub.torch.resolve_mask`).
    Mask names are mapped onto ``model.named_parameters()`` as by
    :func:`maskhub.torch.apply_mask` (``strip_prefix``, ``add_prefix``, ``name_map``;
    ``extra="ignore"`` skips mask tensors the model lacks). Parameters the mask lacks, and
    Linear layers whose mask is all False, get no adapter (they stay frozen).
    ``target_modules`` (PEFT's rule: a regex for the whole module name, or a list of names
    or name suffixes) restricts the adapter to some modules; ``task_type`` (e.g.
    ``"CAUSAL_LM"``) picks PEFT's task class.

    Masked entries SHiRA cannot hold (see the module docstring: non-Linear tensors, tied
    weights, one-row or one-column layers) stay frozen and are named in one warning, or
    raise :class:`~maskhub.errors.UsageError` with ``strict=True``. The adapter config's
    ``mask_type`` records the mask (``maskhub:{"id":..,"name":..,"hub_repo":..}``; read it
    with :func:`adapter_mask_info`). ``model`` is modified in place (PEFT replaces its
    Linear modules); reload a saved adapter with :func:`load_shira_adapter`.
    """
    source = resolve_mask(mask, home)
    try:
        match = match_parameters(model, source, strip_prefix=strip_prefix,
                                 add_prefix=add_prefix, name_map=name_map, missing="freeze",
                                 extra=extra)
    except MaskMismatchError as exc:  # the same diagnosis, with this function's options
        text = str(exc).split(" (map names with", 1)[0]
        raise MaskMismatchError(
            text + " (map names with strip_prefix/add_prefix/name_map; extra='ignore' skips "
            "mask tensors the model lacks)", exc.missing_in_target, exc.missing_in_mask,
            exc.shape_mismatches) from None
    if not match.params:
        label = getattr(source, "name", None) or "the mask"
        raise MaskMismatchError(f"{label} matches no parameter of the model: "
                                + listing(source.tensor_names()), source.tensor_names())
    owners = _owners(model)
    shapes = {s.tensor: tuple(s.shape) for s in source.tensor_stats()}
    counts = {s.tensor: s.n_updated for s in source.tensor_stats()}
    indices: dict[str, torch.Tensor] = {}
    uncovered: list[str] = []
    for target, param, mask_names in match.params.values():
        if not any(counts[n] for n in mask_names):
            continue  # all False: frozen, as under apply_mask
        holders = owners.get(id(param), [])
        mod_name, module, attr = holders[0] if holders else ("", None, "")
        if len(holders) != 1 or len(mask_names) != 1:
            uncovered.append(f"{target} (tied)")
            continue
        if not isinstance(module, nn.Linear) or attr != "weight":
            uncovered.append(f"{target} ({type(module).__name__}.{attr})")
            continue
        if min(module.in_features, module.out_features) < 2:
            uncovered.append(f"{target} ({module.out_features}x{module.in_features})")
            continue
        if not _selected(mod_name, target_modules):
            continue
        bits = np.unpackbits(source.packed(mask_names[0]), count=param.numel(),
                             bitorder=BITORDER).reshape(shapes[mask_names[0]])
        rows, cols = np.nonzero(bits)
        indices[mod_name] = torch.from_numpy(np.stack([rows, cols]).astype(np.int32))
    if uncovered:
        message = (f"{len(uncovered)} masked tensor(s) are not nn.Linear weights SHiRA can "
                   "adapt and stay frozen: " + listing(uncovered))
        if strict:
            raise UsageError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    if not indices:
        raise UsageError("the mask marks no entry of an nn.Linear weight"
                         + (" among target_modules" if target_modules is not None else "")
                         + ": there is nothing for a SHiRA adapter to train")
    with _quiet_mask_type():
        config = ShiraConfig(r=1, mask_type=_mask_type(_identity(source)), task_type=task_type)
    return _build(model, indices, config, adapter_name)


def _adapter_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser()
    if not (root / CONFIG_FILE).is_file():
        raise UsageError(f"{root}: no {CONFIG_FILE} (give the directory that "
                         "save_pretrained wrote; Hub repo ids are not fetched here)")
    if not (root / WEIGHTS_FILE).is_file():
        raise UsageError(f"{root}: no {WEIGHTS_FILE} (only safetensors adapters are read, "
                         "never pickled ones)")
    return root


def _saved_indices(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter file's tensors, and ``{module name: (2, k) indices}`` from it."""
    from safetensors.torch import load_file

    state = load_file(str(root / WEIGHTS_FILE))
    indices: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(INDICES_SUFFIX):
            name = key[: -len(INDICES_SUFFIX)].removeprefix(SAVED_PREFIX)
            indices[name] = value.to(torch.int)
    for name, idx in indices.items():
        weight = state.get(SAVED_PREFIX + name + WEIGHT_SUFFIX, state.get(name + WEIGHT_SUFFIX))
        if weight is None or idx.ndim != 2 or idx.shape[0] != 2 \
                or weight.shape != (idx.shape[1],):
            raise UsageError(f"{root / WEIGHTS_FILE}: {name} has no shira_weight matching its "
                             f"{list(idx.shape)} shira_indices")
    if not indices:
        raise UsageError(f"{root / WEIGHTS_FILE}: no shira_indices (not a SHiRA adapter)")
    return state, indices


def _check_targets(model: nn.Module, indices: Mapping[str, torch.Tensor], where: str) -> None:
    """Each adapted module exists in ``model`` as an nn.Linear its indices fit in."""
    modules = dict(model.named_modules())
    bad = []
    for name, idx in indices.items():
        module = modules.get(name)
        if isinstance(module, ShiraLayer):
            module = module.get_base_layer()
        if not isinstance(module, nn.Linear):
            bad.append(f"{name} (not an nn.Linear of the model)")
        elif idx.numel() and (int(idx[0].max()) >= module.out_features
                              or int(idx[1].max()) >= module.in_features):
            bad.append(f"{name} (indices outside {module.out_features}x{module.in_features})")
    if bad:
        raise MaskMismatchError(f"the adapter at {where} does not fit the model: "
                                f"{len(bad)} module(s): " + listing(bad), bad)


def load_shira_adapter(model: nn.Module, path: str | os.PathLike[str], *,
                       adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Reload a SHiRA adapter saved with ``save_pretrained`` onto a fresh base ``model``.

    ``PeftModel.from_pretrained(model, path)`` cannot load an adapter whose layers hold any
    count but ``r * (m + n)``: PEFT creates each layer's ``shira_weight`` at that size before
    reading the file and then fails with ``size mismatch ... shira_weight`` (SHiRA's config
    has one ``r`` and no per-layer counts). This reads the file's ``shira_indices`` (a
    safetensors file only; nothing is unpickled), builds the layers at their saved sizes and
    loads the weights with PEFT's ``set_peft_model_state_dict``. Works for any SHiRA adapter,
    not only those of :func:`shira_adapter`. ``is_trainable=False`` (PEFT's default) returns
    the model in eval mode with the adapter frozen. Local directories only.
    """
    root = _adapter_dir(path)
    with _quiet_mask_type():
        config = ShiraConfig.from_pretrained(str(root))
    if not isinstance(config, ShiraConfig):
        raise UsageError(f"{root}: a {type(config).__name__} adapter, not a SHiRA one")
    state, indices = _saved_indices(root)
    _check_targets(model, indices, str(root))
    config.inference_mode = not is_trainable
    peft_model = _build(model, indices, config, adapter_name)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "shira_" in k]
    if unexpected:
        raise UsageError(f"{root}: adapter tensors with no place in the model: "
                         + listing(unexpected))
    if not is_trainable:
        peft_model.eval()
    return peft_model


def _layers(model: nn.Module, adapter_name: str) -> dict[str, ShiraLayer]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, ShiraLayer) and adapter_name in m.shira_indices}


def _base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _base_parameter_name(name: str) -> str | None:
    """``x.base_layer.weight`` -> ``x.weight``; adapter parameters -> None."""
    if ".shira_weight." in name or name.startswith("shira_weight."):
        return None
    return name.replace(".base_layer.", ".")


def mask_from_adapter(adapter: nn.Module | str | os.PathLike[str], *,
                      model: nn.Module | None = None, adapter_name: str = "default",
                      all_tensors: bool = False) -> dict[str, np.ndarray]:
    """The mask of a SHiRA adapter: ``{weight name: bool array}``, True at its indices.

    ``adapter``: a ``PeftModel`` (or any module holding SHiRA layers), or the directory
    that ``save_pretrained`` wrote, with ``model=`` the base model (the file has no shapes).
    Names are the base model's parameter names (``...q_proj.weight``), in module order.
    ``all_tensors=True`` adds an all-False array for every other parameter of the base
    model, so that a mask over the whole model comes back whole. The result registers as
    it is: ``Registry().add(bits, name=..., base_model=...)``.
    """
    if isinstance(adapter, (str, os.PathLike)):
        if model is None:
            raise UsageError("mask_from_adapter(path) needs model=, the base model: the "
                             "adapter file holds indices but not the weights' shapes")
        root = _adapter_dir(adapter)
        _, indices = _saved_indices(root)
        base = _base_of(model)
        _check_targets(base, indices, str(root))
        shapes = {}
        for name in indices:
            module = base.get_submodule(name)
            if isinstance(module, ShiraLayer):
                module = module.get_base_layer()
            shapes[name] = (module.out_features, module.in_features)
        order = [n for n, _ in base.named_modules() if n in indices]
    else:
        base = _base_of(adapter)
        layers = _layers(base, adapter_name)
        if not layers:
            raise UsageError(f"the model holds no SHiRA adapter named {adapter_name!r}")
        indices = {n: m.shira_indices[adapter_name] for n, m in layers.items()}
        shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
        order = list(layers)
    adapted: dict[str, np.ndarray] = {}
    for name in order:
        bits = np.zeros(shapes[name], dtype=bool)
        idx = indices[name].detach().cpu().long().numpy()
        bits[idx[0], idx[1]] = True
        adapted[name + ".weight"] = bits
    if not all_tensors:
        return adapted
    out: dict[str, np.ndarray] = {}
    for pname, param in base.named_parameters():
        key = _base_parameter_name(pname)
        if key is not None:
            out[key] = adapted[key] if key in adapted else np.zeros(param.shape, dtype=bool)
    return out


def adapter_mask_info(adapter: nn.Module | str | os.PathLike[str], *,
                      adapter_name: str = "default") -> dict[str, str] | None:
    """The mask an adapter of :func:`shira_adapter` was built from (``id``, ``name``,
    ``hub_repo``, ``hub_revision``, those known), from a ``PeftModel`` or a saved adapter
    directory; None for a SHiRA adapter made otherwise."""
    if isinstance(adapter, (str, os.PathLike)):
        config_path = Path(adapter).expanduser() / CONFIG_FILE
        if not config_path.is_file():
            raise UsageError(f"{Path(adapter).expanduser()}: no {CONFIG_FILE}")
        mask_type = json.loads(config_path.read_text()).get("mask_type")
    else:
        configs = getattr(adapter, "peft_config", {})
        if adapter_name not in configs:
            raise UsageError(f"the model holds no adapter named {adapter_name!r}")
        mask_type = getattr(configs[adapter_name], "mask_type", None)
    if not isinstance(mask_type, str) or not mask_type.startswith(MASK_TYPE_PREFIX):
        return None
    info = json.loads(mask_type[len(MASK_TYPE_PREFIX):])
    return {k: str(v) for k, v in info.items()}
