"""The admin console at /admin (docs/admin-console.md): server-rendered pages over the admin API.

The console is a first-party OAuth client of this very service: admins sign in through the
authorization code flow, the tokens stay on the server side of a sealed HttpOnly cookie, and
every action is a call to the service's own REST API (in-process), so the API's authorization
rules, step-up checks and events apply unchanged.
"""
