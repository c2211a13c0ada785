"""Bundles: manifest schema, atomic writer, verification. Arrives with the first target."""
