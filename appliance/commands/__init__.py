"""Click command groups of the CLI, one module per area; they only parse and print."""
