"""Cryptographic building blocks shared by every package: opaque tokens and their hashes,
secrets sealed at rest."""
