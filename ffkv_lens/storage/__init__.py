"""Storage: atomic files and folders, safetensors + JSON only (never pickle)."""

from ffkv_lens.storage.atomic import atomic_folder, atomic_write_bytes, atomic_write_json, read_json, recover_folder

__all__ = ["atomic_folder", "atomic_write_bytes", "atomic_write_json", "read_json", "recover_folder"]
