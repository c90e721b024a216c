"""absl experiment binaries: flags -> dlcore calls -> table, plots and JSON in --workdir."""
