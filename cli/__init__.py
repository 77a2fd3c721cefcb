"""chatctl: the chatd admin CLI."""
