"""Everything the server keeps on disk: versioned adapters, uploaded files, atomic writes, owner-scoped names."""

from server.store.adapters import AdapterStore
from server.store.files import write_file_atomic, write_json_atomic
from server.store.names import SESSION_PREFIX, StoreError, adapter_lineage, check_name, owner_hash
from server.store.uploads import FileStore

__all__ = ["SESSION_PREFIX", "AdapterStore", "FileStore", "StoreError", "adapter_lineage", "check_name",
           "owner_hash", "write_file_atomic", "write_json_atomic"]
