"""The web console's static files (served by chatd.webconsole): a package only so
that setuptools ships them."""
