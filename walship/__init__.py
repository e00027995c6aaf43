"""walship: PostgreSQL WAL and base backup shipping to object storage."""

__version__ = "0.1.0"
