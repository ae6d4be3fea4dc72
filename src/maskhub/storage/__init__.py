"""Where masks are kept: the Zarr mask store (:mod:`.store`), remote store roots
(:mod:`.remote`, fsspec), whole-store file operations (:mod:`.files`) and the DuckDB SQL
index (:mod:`.index`)."""
