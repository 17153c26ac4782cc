"""Authentication: passwords, tokens, sessions and brute-force protection."""
