"""Beyond one engine: instances on Ray behind one API process (kestrel serve --instances N)."""
