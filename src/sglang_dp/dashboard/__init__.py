"""The live terminal dashboard: pure rendering (`render`) and the refresh loop (`live`)."""
