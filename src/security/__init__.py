"""Cryptographic building blocks shared by every package: secrets sealed at rest."""
