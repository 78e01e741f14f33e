"""GasGuard's small shared core: CLI, settings, wire format, device profiles.

Imports no pymodbus, FastAPI or psycopg at module level, so an edge install stays small.
"""

__version__ = "0.1.0"
