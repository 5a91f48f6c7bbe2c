"""Post-mortems and action items arrive with the post-mortem issue."""
