"""The OpenID Connect provider: clients, the authorization code flow, ID tokens, consent."""
