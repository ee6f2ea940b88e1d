"""peft subpackage."""
