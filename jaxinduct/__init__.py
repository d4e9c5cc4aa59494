"""jaxinduct: find induction heads, and watch them form, across whole training runs."""

__version__ = "0.1.0"
