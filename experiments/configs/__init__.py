"""Config files for the binaries, one per reference run; `schema` holds the shared, typed schema."""
