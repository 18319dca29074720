"""Youth, MDTs and their rosters."""
