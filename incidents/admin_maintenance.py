"""Admin for communications (issue 6)."""
