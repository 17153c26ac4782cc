"""User accounts: schemas, queries, the domain functions that change them, and their cache."""
