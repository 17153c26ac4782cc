"""The hosted pages: sign-in, consent, sign-up, password reset, verification, sign-out.

Server-rendered (Jinja2), working without JavaScript, under a strict Content-Security-Policy,
every form protected against cross-site request forgery.
"""
