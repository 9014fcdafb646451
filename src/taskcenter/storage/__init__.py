"""Storage: the schema, connections and the SQL that moves tasks through their states."""

from taskcenter.storage.database import Database

__all__ = ["Database"]
