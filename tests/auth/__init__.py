"""Authentication tests: keys, access tokens, client assertions, the token endpoint."""
