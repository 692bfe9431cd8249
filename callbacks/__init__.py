"""Cross-cutting training behaviour as Lightning callbacks."""
