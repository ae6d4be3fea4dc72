"""Data definitions of maskhub: metadata models, SQL DDL and migrations. No I/O here."""

from maskhub.schemas.metadata import FORMAT_VERSION, MaskMetadata, TensorStats
from maskhub.schemas.names import parse_tensor_name

__all__ = ["FORMAT_VERSION", "MaskMetadata", "TensorStats", "parse_tensor_name"]
