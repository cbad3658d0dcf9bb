"""Small shared helpers: atomic file output, optional-dependency imports, logging."""
