"""Break-glass: time-limited emergency access for an active team member, queued for review."""
