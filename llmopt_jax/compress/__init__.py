"""compress subpackage."""
