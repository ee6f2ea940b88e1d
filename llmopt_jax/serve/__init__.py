"""serve subpackage."""
