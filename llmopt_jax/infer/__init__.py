"""infer subpackage."""
