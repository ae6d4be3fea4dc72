"""Tensor dtypes as maskhub names them (torch's names), and their sizes: facts read from a
safetensors header, with no tensor library imported."""

from __future__ import annotations

#: safetensors header dtype code -> maskhub / torch dtype name.
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

#: Bytes per element of every dtype maskhub reads.
ITEMSIZE = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1,
    "int16": 2, "int32": 4, "int64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,  # the indices of sparse patches
}

#: dtypes that numpy holds natively (the others, bf16 and float8, need a bit-level view).
NUMPY_DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int16", "int32",
                          "int64", "bool"})


def itemsize(name: str) -> int:
    """Bytes per element of the dtype called ``name`` (``"bfloat16"``...)."""
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None
