"""strategies: see the README's status table; this capability lands with its issue."""
