"""storage: how seglabel reads and writes any fsspec URL (local disks, S3, GCS, http).

    filesystem  opening URLs with retries, origin-only headers, which options apply where
    atomic      files that appear whole or not at all
    read        the bounded regular-file reader everyone uses
    location    Location / Destination: a place seglabel writes to
    spec        YAML job specs read from a URL, bounded; the YAML reader that refuses keys twice
"""

from ..core.lazy import public_names

_PUBLIC = {
    **dict.fromkeys(["open_url", "with_defaults", "OriginHeaders", "absolute_local", "absolute_model",
                     "full_uri", "is_local", "protocols", "options_for"], "filesystem"),
    **dict.fromkeys(["open_atomic", "write_atomic", "is_temporary"], "atomic"),
    **dict.fromkeys(["read_bytes", "regular_target"], "read"),
    **dict.fromkeys(["Location", "Destination"], "location"),
    **dict.fromkeys(["load_spec", "UniqueKeyLoader"], "spec"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
