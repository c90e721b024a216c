"""absl experiment binaries: a config (configs/) -> dlcore calls -> table, plots and JSON in --workdir."""
